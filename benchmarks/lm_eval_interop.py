"""`raftlm eval` against EleutherAI's lm-evaluation-harness on the same GSM8K items.

The model is exported as a standalone HF folder (`raftlm export --format hf`) and evaluated by
both tools: `raftlm eval FOLDER --preset gsm8k` and `lm_eval --model hf` with the task file
`benchmarks/lm_eval/gsm8k_raftlm.yaml` (raftlm's items and prompt under the chat template,
greedy, 256 new tokens, raftlm's strict and lenient rules). Both decode in fp32 by default and
the harness one prompt at a time, so no padding changes its numbers. Prints both accuracies
per rule, how many items the two judge alike, and how many prompts and responses are
identical. Needs `pip install 'raftlm[bench]'` (lm-eval); nothing is downloaded.

    .venv/bin/python benchmarks/lm_eval_interop.py                 # the embedded model, 20 items
    .venv/bin/python benchmarks/lm_eval_interop.py runs/demo --limit 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "benchmarks" / "lm_eval"
RULES = ("strict", "lenient")
LM_EVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="embedded:smollm2-135m-instruct",
                        help="What `raftlm export` takes: a run directory, an HF folder, a .gguf "
                             "file or an embedded model [default: %(default)s].")
    parser.add_argument("--limit", type=int, default=20, help="The first N GSM8K test items.")
    parser.add_argument("--dtype", choices=sorted(LM_EVAL_DTYPES), default="fp32")
    parser.add_argument("--out", type=Path, default=Path("runs/interop"))
    args = parser.parse_args()

    folder = args.out / "model"
    if not (folder / "config.json").exists():
        run(["raftlm", "export", args.model, "--format", "hf", "--out", str(folder)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    seconds = {}
    start = time.perf_counter()
    run(["raftlm", "eval", str(folder), "--preset", "gsm8k", "--limit", str(args.limit),
         "--set", f"model.dtype={args.dtype}", "--output", str(args.out / "raftlm" / "eval.json")],
        env)
    seconds["raftlm eval"] = time.perf_counter() - start
    start = time.perf_counter()
    run(["lm_eval", "--model", "hf", "--model_args",
         f"pretrained={folder},dtype={LM_EVAL_DTYPES[args.dtype]}", "--device", "cpu",
         "--batch_size", "1", "--include_path", str(TASK_DIR), "--tasks", "gsm8k_raftlm",
         "--apply_chat_template", "--limit", str(args.limit), "--log_samples",
         "--output_path", str(args.out / "lm_eval")], env)
    seconds["lm_eval"] = time.perf_counter() - start

    ours = [json.loads(line) for line in (args.out / "raftlm" / "eval.items.jsonl").open()]
    theirs = harness_samples(args.out / "lm_eval")
    if [int(r["prompt_id"]) for r in ours] != sorted(theirs):
        raise SystemExit(f"the tools evaluated different items: {len(ours)} vs {len(theirs)}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    same_prompt = sum(chat_text(tokenizer, r["prompt"]) == theirs[int(r["prompt_id"])]["context"]
                      for r in ours)
    same_response = sum(r["response"].strip() == theirs[int(r["prompt_id"])]["response"].strip()
                        for r in ours)
    n = len(ours)
    print(f"\n{args.model}, GSM8K test items 0..{n - 1}, greedy, {args.dtype}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| rule | raftlm eval | lm-eval | items judged alike |")
    print("| --- | --- | --- | --- |")
    for rule in RULES:
        mine = [bool(r["correct"][rule]) for r in ours]
        harness = [theirs[int(r["prompt_id"])][rule] for r in ours]
        alike = sum(a == b for a, b in zip(mine, harness))
        print(f"| {rule} | {sum(mine) / n:.1%} ({sum(mine)}/{n}) | "
              f"{sum(harness) / n:.1%} ({sum(harness)}/{n}) | {alike}/{n} |")
    print(f"identical prompts {same_prompt}/{n}, identical responses {same_response}/{n}; "
          + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()))


def run(command: list[str], env: dict[str, str] | None = None) -> None:
    """Run a console script of this interpreter's environment; stop on failure."""
    executable = Path(sys.executable).parent / command[0]
    print("$", " ".join(command), flush=True)
    subprocess.run([str(executable), *command[1:]], check=True, env=env)


def harness_samples(output: Path) -> dict[int, dict]:
    """lm-eval's logged samples by item: the context it decoded from, the response, and 0/1 per
    rule (the newest samples file under `output`)."""
    files = sorted(output.glob("*/samples_gsm8k_raftlm_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no lm-eval samples under {output}")
    rows = [json.loads(line) for line in files[-1].open()]
    return {int(row["doc_id"]): {"context": row["arguments"]["gen_args_0"]["arg_0"],
                                 "response": row["resps"][0][0],
                                 **{rule: float(row[rule]) == 1.0 for rule in RULES}}
            for row in rows}


def chat_text(tokenizer, prompt: str) -> str:
    """The text raftlm decodes from: the prompt as one user turn under the chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


if __name__ == "__main__":
    main()
