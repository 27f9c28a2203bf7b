"""Exercise every CUDA path of raftlm on one GPU, with numbers (and on a CPU with `--tiny`).

Nothing is downloaded: random Llama models of real sizes (`--sizes`, see `_gpu_models.SIZES`),
a random reward model and an in-memory tokenizer are built and saved to a temp folder. Sections
(`--only 1,3` picks some):

1. sampler correctness: greedy raftlm sampler vs HF `generate` (fp32 and bf16), token by token;
   recorded log-probs (`Completion.token_log_probs`) vs a teacher-forced forward;
2. throughput (bf16): raftlm vs HF `generate`, sequences forced to full length, next to the
   memory-bandwidth limit (`--bandwidth-gbs`, else from the GPU's name);
3. a 2-stage RAFT run through `raftlm.train` (LoRA and full fine-tuning, bf16), resumed once;
4. `offload: phases` vs `none` with a reward model: peak memory per phase of one stage;
5. peak training memory of one optimizer step per micro-batch size;
6. this round's stage paths: dynamic and gvm collectors with grpo, pi_old recomputed by the
   training forward (the sampler-training gap in bf16) and the rollout correction; one stage
   of multi-turn tool rollouts.

A failing check is reported in its row (status FAIL) and the script goes on; it exits 1 if
any check failed. Speed goals that are missed say "below goal" without failing the run.
Memory is `torch.cuda.max_memory_allocated` on CUDA, peak RSS on a CPU.

    PYTHONPATH=src python benchmarks/gpu_check.py --json gpu_check.json   # GPU (docs/gpu.md)
    PYTHONPATH=src python benchmarks/gpu_check.py --tiny                  # CPU, ~20 s
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_models import (  # noqa: E402
    SIZES,
    TINY,
    BuiltModels,
    Context,
    Row,
    Settings,
    attempt,
    chat_prompts,
    release_memory,
)
from _gpu_train import (  # noqa: E402
    section_offload,
    section_raft,
    section_round,
    section_train_memory,
)

# Peak memory bandwidth (GB/s) by a substring of torch.cuda.get_device_name().
BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10": 600, "L4": 300}
SECTIONS = {1: "sampler correctness", 2: "sampling throughput (bf16)", 3: "RAFT run + resume",
            4: "offload: phases vs none", 5: "training memory per micro-batch",
            6: "this round's stage paths (collectors, pi_old gap, tool rollouts)"}


# --- section 1: sampler correctness -----------------------------------------------------

def load_policy_model(ctx: Context, size: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ctx.models(size).policy
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(ctx.device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, None if equal (a length mismatch counts)."""
    t = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return t if t is not None or len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def next_token_logits(model, ids: list[int], device: torch.device) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float()


def argmax_shortfalls(model, prompt: list[int], ids: list[int], device: torch.device
                      ) -> list[float]:
    """Per generated token: max logit minus the token's logit in a teacher-forced forward."""
    logits = next_token_logits(model, prompt + ids, device)[len(prompt) - 1 : -1]
    chosen = logits.gather(-1, torch.tensor(ids, device=device)[:, None])[:, 0]
    return (logits.max(dim=-1).values - chosen).tolist()


def check_greedy(ctx: Context, size: str, dtype_name: str, rows: list[Row]) -> None:
    """Greedy raftlm vs HF: every difference must be a near-tie of the two chosen tokens, and
    every raftlm token the argmax (up to a near-tie) of a teacher-forced forward."""
    from raftlm.config import GenerationConfig
    from raftlm.sampling.generate import generate

    s = ctx.settings
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, tok = load_policy_model(ctx, size, dtype)
    prompts = chat_prompts(tok, s.correct_prompts)
    outs = {backend: generate(model, tok, prompts, 1, GenerationConfig(
        backend=backend, max_new_tokens=s.correct_tokens, batch_size=len(prompts)),
        greedy=True) for backend in ("raftlm", "hf")}
    tie_tol = 1e-3 if dtype == torch.float32 else 0.1  # logit gap that counts as a tie
    exact, ties, gaps = 0, 0, []
    for prompt, mine, theirs in zip(prompts, outs["raftlm"], outs["hf"]):
        a, b = mine[0].token_ids, theirs[0].token_ids
        t = first_divergence(a, b)
        if t is None:
            exact += 1
            continue
        if t < min(len(a), len(b)):
            logits = next_token_logits(model, prompt + a[:t], ctx.device)[-1]
            gaps.append(abs(float(logits[a[t]] - logits[b[t]])))
            ties += gaps[-1] <= tie_tol
    n = len(prompts)
    detail = f"{exact}/{n} identical, {ties} diverge at a near-tie (gap <= {tie_tol})"
    if gaps:
        detail += f", largest gap at divergence {max(gaps):.2g}"
    rows.append(Row(1, f"{size} {dtype_name} greedy raftlm == HF", detail,
                    "ok" if exact + ties == n else "FAIL"))
    # Every raftlm token, not only the first difference: the argmax of a full forward pass.
    shortfalls = [gap for prompt, row in zip(prompts, outs["raftlm"])
                  for gap in argmax_shortfalls(model, prompt, row[0].token_ids, ctx.device)]
    exact_share = sum(gap == 0 for gap in shortfalls) / len(shortfalls)
    rows.append(Row(1, f"{size} {dtype_name} greedy raftlm == forward argmax",
                    f"{exact_share:.1%} of {len(shortfalls)} tokens exact, largest logit "
                    f"shortfall {max(shortfalls):.2g} (tie <= {tie_tol})",
                    "ok" if max(shortfalls) <= tie_tol else "FAIL"))
    check_log_probs(ctx, size, dtype_name, model, tok, prompts, rows)
    del model
    release_memory()


def check_log_probs(ctx: Context, size: str, dtype_name: str, model, tok, prompts, rows) -> None:
    """Recorded log pi(token|prefix) vs a teacher-forced forward of the same sequence."""
    from raftlm.config import GenerationConfig
    from raftlm.sampling.generate import generate

    tol = 1e-3 if dtype_name == "fp32" else 0.1  # mean |difference|, nats per token
    for backend in ("raftlm", "hf"):
        config = GenerationConfig(backend=backend, max_new_tokens=ctx.settings.correct_tokens)
        out = generate(model, tok, prompts[:4], 2, config, seeds=list(range(len(prompts[:4]))))
        done = [(p, c) for p, row in zip(prompts, out) for c in row]
        if any(c.token_log_probs is None for _, c in done):
            rows.append(Row(1, f"{size} {dtype_name} {backend} log-probs", "not recorded"))
            continue
        diffs = []
        for prompt, c in done:
            logits = next_token_logits(model, prompt + c.token_ids, ctx.device)
            forced = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            forced = forced.gather(-1, torch.tensor(c.token_ids, device=ctx.device)[:, None])
            diffs += (forced[:, 0].cpu() - torch.tensor(c.token_log_probs)).abs().tolist()
        mean, worst = sum(diffs) / len(diffs), max(diffs)
        rows.append(Row(1, f"{size} {dtype_name} {backend} log-probs vs teacher-forced",
                        f"mean |diff| {mean:.2g}, max {worst:.2g} nats ({len(diffs)} tokens)",
                        "ok" if mean <= tol else "FAIL"))


def section_correctness(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for size in ctx.sizes:
        for dtype_name in ("fp32", "bf16"):
            attempt(rows, 1, f"{size} {dtype_name}", check_greedy, ctx, size, dtype_name, rows)
    return rows


# --- section 2: throughput --------------------------------------------------------------

def bandwidth_limit(built: BuiltModels, batch: int, context_len: float, gbs: float) -> float:
    """tokens/s if every decode step only had to read the weights and the KV cache once."""
    c = built.config
    head_dim = c.hidden_size // c.num_attention_heads
    kv_bytes = batch * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2 * context_len
    return batch * gbs * 1e9 / (built.n_params * 2 + kv_bytes)


def fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"


def timed_generate(ctx: Context, model, tok, prompts, k: int, backend: str, new: int
                   ) -> tuple[int, float]:
    from raftlm.config import GenerationConfig
    from raftlm.sampling.generate import generate

    config = GenerationConfig(backend=backend, max_new_tokens=new, batch_size=len(prompts) * k)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, tok, prompts, k, config, seeds=list(range(len(prompts))))
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(c.token_ids) for row in out for c in row), time.perf_counter() - start


def section_throughput(ctx: Context) -> list[Row]:
    s, rows = ctx.settings, []
    for size in ctx.sizes:
        model, tok = load_policy_model(ctx, size, torch.bfloat16)
        # No eos: every sequence runs to throughput_tokens, so both backends do equal work.
        tok.eos_token = None
        model.generation_config.eos_token_id = None
        k = s.samples_per_prompt
        for backend in ("raftlm", "hf"):  # warm-up: kernels, allocator, autotuning
            timed_generate(ctx, model, tok, chat_prompts(tok, 2, s.prompt_tokens), k, backend, 4)
        for batch in s.batches:
            prompts = chat_prompts(tok, batch // k, s.prompt_tokens)
            rate = {}
            for backend in ("raftlm", "hf"):
                tokens, seconds = timed_generate(ctx, model, tok, prompts, k, backend,
                                                 s.throughput_tokens)
                rate[backend] = tokens / seconds
            ratio = rate["raftlm"] / rate["hf"]
            context = sum(map(len, prompts)) / len(prompts) + s.throughput_tokens / 2
            value = (f"raftlm {fmt_rate(rate['raftlm'])} tok/s, HF {fmt_rate(rate['hf'])} tok/s, "
                     f"ratio {ratio:.2f}x; bandwidth limit ")
            if ctx.bandwidth_gbs:
                limit = bandwidth_limit(ctx.models(size), batch, context, ctx.bandwidth_gbs)
                value += f"{fmt_rate(limit)} tok/s (raftlm at {rate['raftlm'] / limit:.0%})"
            else:
                value += "n/a"
            goal = ctx.device.type == "cuda" and batch == 256
            status = ("ok" if ratio >= 5 else "below goal") if goal else "info"
            rows.append(Row(2, f"{size} batch {batch} (K={k}) x {s.throughput_tokens} new",
                            value + (" (goal >= 5x)" if goal else ""), status))
        del model
        release_memory()
    return rows


SECTION_FUNCTIONS = {1: section_correctness, 2: section_throughput, 3: section_raft,
                     4: section_offload, 5: section_train_memory, 6: section_round}


# --- driver -----------------------------------------------------------------------------

def bandwidth_for(device_name: str) -> float | None:
    """Peak memory bandwidth (GB/s) of a known GPU, from its name; None if unknown."""
    return next((gbs for key, gbs in BANDWIDTH_GBS.items() if key in device_name), None)


def detect_bandwidth(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    return bandwidth_for(torch.cuda.get_device_name(device))


def device_description(device: torch.device) -> str:
    import transformers

    what = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return (f"{device.type}: {what or 'cpu'}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def print_table(rows: list[Row], sections: list[int]) -> None:
    width = max([len(r.check) for r in rows] + [20])
    for section in sections:
        print(f"\n== {section}. {SECTIONS[section]} ==")
        for r in (r for r in rows if r.section == section):
            print(f"  {r.check:<{width}}  {r.status:<10}  {r.value}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="small workloads (and tiny models unless --sizes): the CPU test")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated model sizes from {sorted(SIZES)} (default "
                             "0.5b,1.5b; tiny with --tiny); sections 3-5 use the first")
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated sections to run")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="GPU memory bandwidth in GB/s (default: from the device name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and runs here")
    args = parser.parse_args(argv)
    try:
        args.sections = sorted({int(x) for x in args.only.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--only: expected section numbers like 1,3, got {args.only!r}")
    sizes = args.sizes or ("tiny" if args.tiny else "0.5b,1.5b")
    args.size_list = [x.strip() for x in sizes.split(",")]
    for bad in [n for n in args.sections if n not in SECTIONS] + [
            z for z in args.size_list if z not in SIZES]:
        parser.error(f"unknown section or size: {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = Context(TINY if args.tiny else Settings(), device, args.workdir or Path(tmp),
                      args.size_list, detect_bandwidth(device, args.bandwidth_gbs))
        described = device_description(device)
        print(f"gpu_check on {described}; bandwidth {ctx.bandwidth_gbs or 'n/a'} GB/s", flush=True)
        rows: list[Row] = []
        for section in args.sections:
            start = time.perf_counter()
            attempt(rows, section, "section", lambda n=section: rows.extend(
                SECTION_FUNCTIONS[n](ctx)))
            print(f"section {section} done in {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows, args.sections)
    failed = [r for r in rows if r.status == "FAIL"]
    print(f"\n{len(failed)} failed check(s)" if failed else "\nall checks passed")
    if args.json:
        args.json.write_text(json.dumps({
            "device": described, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "bandwidth_gbs": ctx.bandwidth_gbs, "sections": args.sections,
            "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
