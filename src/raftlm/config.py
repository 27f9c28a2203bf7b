"""Run configuration: plain dataclasses, loaded from YAML, overridable with ``key.sub=value``.

Every field carries its default and a one-line help (``raftlm train --help`` prints them).
Validation happens once, at load, and names the offending field.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
OBJECTIVES = ("sft", "reward_weighted", "raft++", "reinforce_rej", "grpo")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help line (lists/dicts copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    output_dir: str = option("runs/raft", "Run directory: config, metrics, stages, checkpoints.")
    seed: int = option(0, "Seed for prompt order, sampling and initialisation.")
    overwrite: bool = option(False, "Replace an existing run in output_dir (else refuse).")
    threads: int = option(0, "torch CPU threads; 0 keeps torch's default.")
    keep_checkpoints: int = option(2, "Stage checkpoints to keep (the newest); 0 keeps all.")


@dataclass
class LoraConfig:
    enabled: bool = option(True, "Train a LoRA adapter instead of all weights.")
    r: int = option(16, "LoRA rank.")
    alpha: int = option(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = option(0.0, "LoRA dropout.")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get adapters.",
    )


@dataclass
class ModelConfig:
    path: str = option(EMBEDDED_MODEL, "HF model folder, a .gguf file, or the embedded model.")
    gguf_file: str | None = option(None, "GGUF file name inside `path`, when path is a folder.")
    dtype: str = option("auto", "fp32, bf16 or auto (bf16 where the hardware runs it fast).")
    gradient_checkpointing: bool = option(False, "Trade compute for activation memory.")
    cache_dir: str = option("~/.cache/raftlm", "Where GGUF models are converted to safetensors.")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    task: str | None = option(None, "Built-in task (`arithmetic`); replaces train_file/eval_file.")
    train_file: str | None = option(None, "Prompt file: .jsonl, .json, .csv or .parquet.")
    eval_file: str | None = option(None, "Held-out prompt file (same formats).")
    prompt_field: str = option("prompt", "Column with the prompt: text or chat messages.")
    system_prompt: str | None = option(None, "System message prepended to text prompts.")
    max_prompt_tokens: int = option(512, "Longer prompts are skipped and counted, never cut.")
    max_eval_prompts: int = option(0, "Use at most this many held-out prompts; 0 = all.")
    task_train_size: int = option(2000, "Built-in task: number of training prompts.")
    task_eval_size: int = option(100, "Built-in task: number of held-out prompts.")
    dataset: str | None = option(
        None, "HF dataset instead of train_file: a save_to_disk folder or a name in the local "
              "HF cache (nothing is downloaded).")
    split: str = option("train", "data.dataset: the split with the training prompts.")
    eval_split: str | None = option(None, "data.dataset: a held-out split (else eval_file).")
    dataset_config: str | None = option(None, "data.dataset: the dataset's configuration name.")


@dataclass
class RaftStageConfig:
    stages: int = option(10, "T: number of RAFT stages.")
    prompts_per_stage: int = option(32, "b: prompts drawn per stage.")
    samples_per_prompt: int = option(8, "K: responses sampled per prompt.")


@dataclass
class GenerationConfig:
    backend: str = option("raftlm", "raftlm (fast sampler), hf (model.generate) or vllm.")
    max_new_tokens: int = option(64, "Maximum tokens per response.")
    temperature: float = option(1.0, "Sampling temperature (> 0).")
    top_p: float = option(1.0, "Nucleus sampling mass; 1.0 disables.")
    top_k: int = option(0, "Sample among the k most likely tokens; 0 disables.")
    stop_strings: list[str] = option([], "Stop a response after any of these strings.")
    batch_size: int = option(64, "Sequences decoded together.")
    vllm_tensor_parallel_size: int = option(1, "vLLM backend: tensor-parallel GPUs.")
    vllm_gpu_memory_utilization: float = option(0.5, "vLLM backend: GPU memory fraction.")


@dataclass
class RewardTerm:
    name: str = option("", "Built-in (numeric_answer, math_answer), `pkg.mod:fn` or `file.py:fn`.")
    model: str | None = option(None, "Local HF sequence-classification reward model folder.")
    weight: float = option(1.0, "Weight in the summed reward.")
    batch_size: int = option(16, "Reward model: sequences per forward pass.")


@dataclass
class RewardConfig:
    terms: list[RewardTerm] = field(
        default_factory=lambda: [RewardTerm(name="numeric_answer")],
        metadata={"help": "Reward terms; the reward is their weighted sum."},
    )
    on_error: str = option("raise", "raise: stop the run; skip: drop the candidate and count it.")


@dataclass
class SelectionConfig:
    strategy: str = option("best_per_prompt", "best_per_prompt, top_fraction or top_k_per_prompt.")
    top_fraction: float = option(0.25, "top_fraction: share of all candidates kept.")
    top_k: int = option(1, "top_k_per_prompt: responses kept per prompt.")
    min_reward: float | None = option(None, "Drop selected responses below this reward.")
    drop_uniform_prompts: bool = option(False, "Drop prompts whose K rewards are all equal.")
    min_response_tokens: int = option(1, "Drop responses shorter than this.")
    drop_truncated: bool = option(False, "Drop responses cut at max_new_tokens (never stopped).")
    reject_pattern: str | None = option(None, "Drop responses matching this regex.")
    deduplicate: bool = option(True, "Keep one copy of identical responses to a prompt.")


@dataclass
class TrainingConfig:
    learning_rate: float = option(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    epochs: int = option(1, "E: passes over each stage's selected set.")
    micro_batch_size: int = option(8, "Examples per forward/backward.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    lr_scheduler: str = option("constant", "constant, linear or cosine; spans the whole run.")
    warmup_steps: int = option(0, "Linear warm-up steps at the start of the run.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 disables.")
    bf16_autocast: bool = option(
        False, "Train under bf16 autocast (fp32 weights kept; sampling keeps model.dtype): "
        "~2x faster steps on CPUs with AVX-512 bf16 and on GPUs.")
    objective: str = option("sft", "sft, reward_weighted, raft++, reinforce_rej or grpo "
                            "(docs/objectives.md).")
    clip_eps: float = option(0.2, "Ratio objectives: PPO clip range, rho in [1-eps, 1+eps].")
    dual_clip: float | None = option(None, "Ratio objectives: dual-clip constant c > 1 for "
                                     "negative advantages (e.g. 3); None disables.")
    weight_transform: str = option("none", "reward_weighted: none (raw reward), minmax or rank "
                                   "per prompt.")
    kl_coef: float = option(0.0, "Weight of the k3 KL penalty to the initial policy (LoRA).")


@dataclass
class EvalConfig:
    enabled: bool = option(True, "Evaluate before stage 1 and after every stage.")
    sampled: bool = option(True, "Also sample K responses per held-out prompt (diversity, KL).")
    samples_per_prompt: int = option(4, "Samples per held-out prompt for sampled metrics.")
    kl_responses: int = option(64, "Responses the KL estimate uses (a forward each); 0 = all.")
    max_new_tokens: int | None = option(None, "Eval response cap; None = generation's.")
    every: int = option(1, "Evaluate after every N-th stage (stage 0 and the last always).")


@dataclass
class TrackingConfig:
    tensorboard: bool = option(False, "Also log to TensorBoard (run_dir/tensorboard).")
    wandb: bool = option(False, "Also log to Weights & Biases.")
    wandb_project: str = option("raftlm", "W&B project name.")
    report: bool = option(True, "Write report.html at the end of the run.")


@dataclass
class RaftConfig:
    """Everything a RAFT run needs. Load with ``RaftConfig.from_yaml(path, overrides)``."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    raft: RaftStageConfig = field(default_factory=RaftStageConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    offload: str = option("none", "none, or phases: policy and reward model never co-resident.")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RaftConfig:
        """Load a YAML file, apply ``key.sub=value`` overrides, validate."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
        return cls.from_dict(raw, overrides, source=str(path))

    @classmethod
    def from_dict(
        cls, raw: dict, overrides: list[str] | None = None, source: str = "config"
    ) -> RaftConfig:
        raw = _deepcopy(raw)
        for item in overrides or []:
            _apply_override(raw, item)
        config = _build(cls, raw, where=source, prefix="")
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Check values that types alone cannot; raise ConfigError naming the field."""
        checks = [
            ("model.dtype", self.model.dtype in {"auto", "fp32", "bf16"}, "auto, fp32 or bf16"),
            ("raft.stages", self.raft.stages >= 1, ">= 1"),
            ("raft.prompts_per_stage", self.raft.prompts_per_stage >= 1, ">= 1"),
            ("raft.samples_per_prompt", self.raft.samples_per_prompt >= 1, ">= 1"),
            ("generation.backend", self.generation.backend in {"raftlm", "hf", "vllm"},
             "raftlm, hf or vllm"),
            ("generation.max_new_tokens", self.generation.max_new_tokens >= 1, ">= 1"),
            ("generation.temperature", self.generation.temperature > 0, "> 0"),
            ("generation.top_p", 0 < self.generation.top_p <= 1, "in (0, 1]"),
            ("generation.top_k", self.generation.top_k >= 0, ">= 0"),
            ("generation.batch_size", self.generation.batch_size >= 1, ">= 1"),
            ("reward.terms", len(self.reward.terms) >= 1, "at least one reward term"),
            ("reward.on_error", self.reward.on_error in {"raise", "skip"}, "raise or skip"),
            ("selection.strategy",
             self.selection.strategy in {"best_per_prompt", "top_fraction", "top_k_per_prompt"},
             "best_per_prompt, top_fraction or top_k_per_prompt"),
            ("selection.top_fraction", 0 < self.selection.top_fraction <= 1, "in (0, 1]"),
            ("selection.top_k", self.selection.top_k >= 1, ">= 1"),
            ("training.learning_rate", self.training.learning_rate > 0, "> 0"),
            ("training.epochs", self.training.epochs >= 1, ">= 1"),
            ("training.micro_batch_size", self.training.micro_batch_size >= 1, ">= 1"),
            ("training.gradient_accumulation_steps",
             self.training.gradient_accumulation_steps >= 1, ">= 1"),
            ("training.lr_scheduler",
             self.training.lr_scheduler in {"constant", "linear", "cosine"},
             "constant, linear or cosine"),
            ("offload", self.offload in {"none", "phases"}, "none or phases"),
            ("evaluation.every", self.evaluation.every >= 1, ">= 1"),
            *self._objective_checks(),
        ]
        for i, term in enumerate(self.reward.terms):
            checks.append((f"reward.terms[{i}]", bool(term.name) != bool(term.model),
                           "exactly one of `name` or `model`"))
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {self._get(name)!r}")
        if self.data.task is None and not self.data.train_file and not self.data.dataset:
            raise ConfigError("data: set `task` (built-in), `train_file` or `dataset`")
        if self.data.train_file and self.data.dataset:
            raise ConfigError("data: set `train_file` or `dataset`, not both")
        if self.data.eval_split and not self.data.dataset:
            raise ConfigError("data.eval_split: needs data.dataset")
        if self.data.eval_split and self.data.eval_file:
            raise ConfigError("data: set `eval_file` or `eval_split`, not both")

    def _objective_checks(self) -> list[tuple[str, bool, str]]:
        t, k = self.training, self.raft.samples_per_prompt
        return [
            ("training.objective", t.objective in OBJECTIVES, ", ".join(OBJECTIVES)),
            ("training.clip_eps", t.clip_eps > 0, "> 0"),
            ("training.dual_clip", t.dual_clip is None or t.dual_clip > 1, "> 1 or null"),
            ("training.weight_transform", t.weight_transform in {"none", "minmax", "rank"},
             "none, minmax or rank"),
            ("training.kl_coef", t.kl_coef >= 0, ">= 0"),
            ("training.kl_coef", t.kl_coef == 0 or self.model.lora.enabled,
             "0 without LoRA (the initial policy is the base with the adapter disabled)"),
            ("raft.samples_per_prompt",
             k >= 2 or t.objective not in {"reinforce_rej", "grpo"},
             f">= 2 for training.objective={t.objective} (advantages compare K responses)"),
        ]

    def _get(self, dotted: str) -> Any:
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part.split("[")[0], None)
        return value


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it."""


def field_help(cls: type = RaftConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every leaf field, for ``--help``."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_help(hints[f.name], name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = [dataclasses.asdict(d) for d in default]
        rows.append((name, f.metadata.get("help", ""), default))
    return rows


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _apply_override(raw: dict, item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML, so numbers, lists and null work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, _, text = item.partition("=")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {names}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _convert(hints[key], value, where, prefix + key)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, where, name + ".")
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where}: {name} must not be null")
    if text.startswith("list[RewardTerm]") or "list[raftlm.config.RewardTerm]" in text:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {name} must be a list of reward terms")
        return [
            _build(RewardTerm, {"name": v} if isinstance(v, str) else v, where, f"{name}[{i}].")
            for i, v in enumerate(value)
        ]
    if text.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
        return [str(v) for v in value]
    base = hint if isinstance(hint, type) else _scalar_type(text)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"true", "1", "yes", "on"}:
                return True
            if str(value).lower() in {"false", "0", "no", "off"}:
                return False
            raise ValueError(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {name} must be {base.__name__}, got {value!r}"
        ) from None


def _scalar_type(text: str) -> type:
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in text:
            return typ
    return str
