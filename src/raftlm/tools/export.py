"""`raftlm export RUN_DIR --format hf|gguf --out PATH`: a run's policy as a standalone model.

- ``hf``: an ordinary Hugging Face folder, LoRA merged into the base (peft ``merge_and_unload``),
  tokenizer, generation config and a model card (base model, the run's config, its held-out
  results per stage): ``from_pretrained`` and vLLM load it as is.
- ``gguf``: one GGUF file (f16 or f32) for llama.cpp and ollama, written with the ``gguf``
  package (``raftlm.tools.gguf_file``); Llama-architecture models only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from raftlm.config import EMBEDDED_MODEL
from raftlm.errors import InvalidInput
from raftlm.run.rundir import RunDir, share_like_umask
from raftlm.tools.gguf_file import write_gguf
from raftlm.tools.target import Target, load_target

FORMATS = ("hf", "gguf")
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF file holds
CARD_METRICS = [
    ("eval/accuracy", "held-out accuracy (greedy)"),
    ("eval/reward_mean", "held-out reward (greedy)"),
    ("eval/sampled_reward_mean", "sampled reward"),
    ("eval/pass_at_k", "pass@K"),
    ("eval/kl_to_initial", "KL to the base"),
    ("eval/distinct_2", "distinct-2"),
]


def export(path: str | Path, out: str | Path, fmt: str, stage: int | None = None,
           gguf_dtype: str = "f16") -> Path:
    """Export RUN_DIR's stage (latest by default) or a model as `fmt`; returns what it wrote."""
    if fmt not in FORMATS:
        raise InvalidInput(f"--format: expected hf or gguf, got {fmt!r}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out: {out} exists; choose a new path")
    target = load_target(path, stage, dtype="fp32")  # merge and convert in full precision
    model = merged_model(target.model)
    if fmt == "gguf":
        write_gguf(model, target.tokenizer, out, gguf_dtype,
                   name=model_name(target), base_gguf=_base_gguf(target))
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    share_like_umask(staging)  # mkdtemp's private 0700 would hide the model from other users
    try:
        write_hf_folder(model, target, staging)
        shutil.move(str(staging), out)  # the folder appears only when complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def merged_model(model: Any) -> Any:
    """The plain transformers model: a LoRA adapter merged into the base weights."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()


def write_hf_folder(model: Any, target: Target, folder: Path) -> None:
    """Weights (safetensors), tokenizer, generation config and README.md into `folder`."""
    tokenizer, generation = target.tokenizer, target.config.generation
    settings = model.generation_config
    settings.eos_token_id = tokenizer.eos_token_id
    settings.pad_token_id = tokenizer.pad_token_id
    settings.do_sample = True
    settings.temperature = generation.temperature
    settings.top_p = generation.top_p
    settings.top_k = generation.top_k or None
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(target))


def model_name(target: Target) -> str:
    if target.run_dir is None:
        return Path(target.config.model.path).name
    return f"{target.run_dir.resolve().name}-stage-{target.stage:03d}"


def model_card(target: Target) -> str:
    """A model card: base model, what the run did, held-out results per stage, its config."""
    config, base = target.config, target.config.model.path
    base = EMBEDDED_BASE if base == EMBEDDED_MODEL else base
    lines = ["---", yaml.safe_dump({"base_model": base, "library_name": "transformers",
                                    "tags": ["raftlm", "raft"]}).strip(), "---", "",
             f"# {model_name(target)}", ""]
    if target.run_dir is None:
        lines += [f"`{base}` exported by raftlm (no RAFT run: the model as given).", ""]
        return "\n".join(lines)
    lines += [
        f"A RAFT (Reward rAnked FineTuning) fine-tune of `{base}` made with raftlm: stage "
        f"{target.stage} of {config.raft.stages} of the run `{target.run_dir.resolve().name}` "
        f"({'LoRA merged into the base' if config.model.lora.enabled else 'full fine-tune'}).",
        "", "## Held-out results per stage (measured, from the run's metrics.jsonl)", "",
        *results_table(RunDir(target.run_dir).read_metrics(), target.stage), "",
        "Stage 0 is the base model before any RAFT stage.", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", "",
        "vLLM: `vllm serve PATH`. The chat template is the one the run trained with.", "",
        "## The run's config", "", "```yaml", config.to_yaml().strip(), "```", "",
    ]
    return "\n".join(lines)


def results_table(metrics: list[dict[str, Any]], exported_stage: int | None) -> list[str]:
    """Markdown rows of the held-out metrics per stage; the exported stage is marked."""
    columns = [(k, label) for k, label in CARD_METRICS if any(k in m for m in metrics)]
    if not columns:
        return ["No held-out evaluation was recorded in this run."]
    rows = ["| stage | " + " | ".join(label for _, label in columns) + " |",
            "|---" * (len(columns) + 1) + "|"]
    for m in metrics:
        mark = " (exported)" if m.get("stage") == exported_stage else ""
        values = [_fmt(m.get(key)) for key, _ in columns]
        rows.append(f"| {m.get('stage')}{mark} | " + " | ".join(values) + " |")
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "—" if value is None else json.dumps(value)


def _base_gguf(target: Target) -> Path | None:
    """The base model's own GGUF file, when it came from one (its tokenizer metadata helps)."""
    from raftlm.models.loading import resolve_model_source

    folder, gguf_file = resolve_model_source(target.config.model)
    return folder / gguf_file if gguf_file else None
