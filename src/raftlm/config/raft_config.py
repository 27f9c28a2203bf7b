"""``RaftConfig``: every section of a run's configuration, loaded from YAML, overridable with
``key.sub=value``, validated once at load (the error names the field and the file).

Names that moved keep working for one release, each with a one-line note (`MOVED`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raftlm.config.paths import relative_to_file
from raftlm.config.schema import (
    ConfigError,
    build,
    check_choices,
    check_override,
    check_values,
    with_overrides,
)
from raftlm.config.schema import field_help as _field_help
from raftlm.config.sections import (
    DataConfig,
    EvalConfig,
    GenerationConfig,
    ModelConfig,
    RaftStageConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    SelectionConfig,
    TrackingConfig,
    TrainingConfig,
    option,
)
from raftlm.config.stages import schedule_values, stage_value
from raftlm.config.teaching import active_hints

# Old dotted name -> new one: a choice's knobs moved into the choice's own sub-section.
MOVED = {
    "raft.sampling": "raft.collector",
    "raft.max_sampling_rounds": "raft.dynamic.max_rounds",
    **{f"raft.gvm_{name}": f"raft.gvm.{name}" for name in (
        "first_samples", "max_samples", "budget", "accept_reward", "alpha", "beta", "grad_norm")},
    "generation.vllm_tensor_parallel_size": "generation.vllm.tensor_parallel_size",
    "generation.vllm_gpu_memory_utilization": "generation.vllm.gpu_memory_utilization",
}


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
    rollout: RolloutConfig | None = option(
        None, "Multi-turn rollouts with tools or an environment (docs/agents.md); "
        "null: one turn.")
    offload: str = option("none", "phases: policy and reward model never co-resident.",
                          choices=("none", "phases"))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RaftConfig:
        """Load a YAML file (its relative paths relative to its folder: `config/paths.py`),
        apply ``key.sub=value`` overrides, validate."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
        return cls.from_dict(relative_to_file(raw, path), overrides, source=str(path))

    @classmethod
    def from_dict(
        cls, raw: dict, overrides: list[str] | None = None, source: str = "config"
    ) -> RaftConfig:
        overrides = [moved_override(item) for item in overrides or []]
        for item in overrides:  # a typo on the command line is blamed on it, not on the file
            check_override(cls, item)
        raw = moved_names(with_overrides(raw, overrides), source)
        config = build(cls, raw, where=source)
        try:
            config.validate()
        except ConfigError as err:  # say which file, as the type errors do
            raise ConfigError(f"{source}: {err}") from None
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Check values that types alone cannot; raise ConfigError naming the field."""
        check_choices(self)
        checks = [
            ("raft.stages", self.raft.stages >= 1, ">= 1"),
            ("raft.prompts_per_stage", self.raft.prompts_per_stage >= 1, ">= 1"),
            ("raft.samples_per_prompt", self.raft.samples_per_prompt >= 1, ">= 1"),
            ("raft.dynamic.max_rounds", self.raft.dynamic.max_rounds >= 1, ">= 1"),
            ("raft.gvm.first_samples", self.raft.gvm.first_samples >= 1, ">= 1"),
            ("raft.gvm.max_samples", self.raft.gvm.max_samples >= self.raft.gvm.first_samples,
             ">= raft.gvm.first_samples"),
            ("raft.gvm.budget", self.raft.gvm.budget == 0 or self.raft.gvm.budget >=
             self.raft.prompts_per_stage * self.raft.gvm.first_samples,
             "0 (b x K) or >= raft.prompts_per_stage x raft.gvm.first_samples (the first round "
             "alone spends that)"),
            ("raft.gvm.alpha", self.raft.gvm.alpha >= 0, ">= 0"),
            # gvm counts a response as accepted from a reward threshold: one must exist.
            ("raft.gvm.accept_reward", self.raft.collector != "gvm" or self.raft.gvm.accept_reward
             is not None or self.selection.min_reward is not None,
             "a number when raft.collector=gvm and selection.min_reward is null (which reward "
             "counts as accepted)"),
            ("generation.max_new_tokens", self.generation.max_new_tokens >= 1, ">= 1"),
            ("generation.temperature", bool(schedule_values(self.generation.temperature))
             and min(schedule_values(self.generation.temperature)) > 0, "> 0 (every value)"),
            ("selection.min_reward", self.selection.min_reward != [], "a number, a non-empty "
             "list, a ramp or null"),
            ("generation.top_p", 0 < self.generation.top_p <= 1, "in (0, 1]"),
            ("generation.top_k", self.generation.top_k >= 0, ">= 0"),
            ("generation.batch_size", self.generation.batch_size >= 1, ">= 1"),
            ("reward.terms", len(self.reward.terms) >= 1, "at least one reward term"),
            ("selection.top_fraction", 0 < self.selection.top_fraction <= 1, "in (0, 1]"),
            ("selection.top_k", self.selection.top_k >= 1, ">= 1"),
            ("training.learning_rate", self.training.learning_rate > 0, "> 0"),
            ("training.epochs", self.training.epochs >= 1, ">= 1"),
            ("training.micro_batch_size", self.training.micro_batch_size >= 1, ">= 1"),
            ("training.gradient_accumulation_steps",
             self.training.gradient_accumulation_steps >= 1, ">= 1"),
            ("evaluation.every", self.evaluation.every >= 1, ">= 1"),
            ("tracking.log_completions", self.tracking.log_completions >= 0, ">= 0"),
            *self._objective_checks(),
        ]
        for i, term in enumerate(self.reward.terms):
            term.check(f"reward.terms[{i}]")
        if self.rollout is not None:
            self.rollout.check("rollout")
        self._teaching_checks()
        self.evaluation.check("evaluation")
        self._stage_checks()
        check_values(self, "", checks)
        if self.data.task is None and not self.data.train_file and not self.data.dataset:
            raise ConfigError("data: set `task` (built-in), `train_file` or `dataset`")
        if self.data.train_file and self.data.dataset:
            raise ConfigError("data: set `train_file` or `dataset`, not both")
        if self.data.eval_split and not self.data.dataset:
            raise ConfigError("data.eval_split: needs data.dataset")
        if self.data.eval_split and self.data.eval_file:
            raise ConfigError("data: set `eval_file` or `eval_split`, not both")

    def _teaching_checks(self) -> None:
        hints, teacher = active_hints(self), self.generation.teacher
        if hints is not None:
            hints.check("raft.hints")
            if hints.accept_reward is None and self.selection.min_reward is None:
                raise ConfigError("raft.hints.accept_reward: expected a number when "
                                  "selection.min_reward is null (which reward counts as "
                                  "solved), got None")
        if teacher is not None:
            teacher.check("generation.teacher")
        if self.rollout is not None and (hints or teacher):
            raise ConfigError(f"{'raft.hints' if hints else 'generation.teacher'}: expected no "
                              "`rollout` section (hints and teachers answer single-turn "
                              "prompts), got one")

    def _stage_checks(self) -> None:
        """raft.replay, data.anchor and training.start (settings across sections of theirs
        that need the objective: `raftlm.stage.replay.check_stage_settings`)."""
        replay = self.raft.replay
        if replay is not None:
            replay.check("raft.replay")
        if self.data.anchor is not None:
            self.data.anchor.check("data.anchor")
        if self.training.start == "restart" and (
                replay is None or replay.window != 0 or replay.share is not None):
            got = "null" if replay is None else f"window {replay.window}, share {replay.share}"
            raise ConfigError(
                "training.start: restart trains the initial policy on the kept responses of "
                "every stage so far: it needs raft.replay with window 0 (all stages) and share "
                f"null (raft.replay: {{}}), got raft.replay {got}")

    def at_stage(self, stage: int) -> RaftConfig:
        """This config with each per-stage schedule (`generation.temperature`,
        `selection.min_reward`) at stage `stage`'s value (stage 0, the baseline: stage 1's):
        what a stage's sampling, ranking, training and evaluation read."""
        stages = self.raft.stages
        generation = dataclasses.replace(
            self.generation, temperature=stage_value(self.generation.temperature, stage, stages))
        selection = dataclasses.replace(
            self.selection, min_reward=stage_value(self.selection.min_reward, stage, stages))
        return dataclasses.replace(self, generation=generation, selection=selection)

    def _objective_checks(self) -> list[tuple[str, bool, str]]:
        t = self.training
        return [
            ("training.clip_eps", t.clip_eps > 0, "> 0"),
            ("training.dual_clip", t.dual_clip is None or t.dual_clip > 1, "> 1 or null"),
            ("training.kl_coef", t.kl_coef >= 0, ">= 0"),
            ("training.kl_coef", t.kl_coef == 0 or self.model.lora.enabled,
             "0 without LoRA (the initial policy is the base with the adapter disabled)"),
            ("training.clip_eps_high", t.clip_eps_high is None or t.clip_eps_high > 0,
             "> 0 or null"),
            ("training.loss_norm_tokens", t.loss_norm_tokens >= 0, ">= 0"),
            ("training.group_std_ddof", t.group_std_ddof in (0, 1), "0 or 1"),
            ("training.overlong_buffer", t.overlong_buffer >= 0, ">= 0"),
            ("training.overlong_penalty", t.overlong_penalty >= 0, ">= 0"),
        ]  # settings across sections: raftlm.training.objectives.check_objective_config


def field_help(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every field of ``cls`` (RaftConfig), for ``--help``."""
    return _field_help(cls or RaftConfig, prefix)


def moved_override(item: str) -> str:
    """`--set OLD=value` as `NEW=value` for a name of `MOVED` (with the same one-line note)."""
    key, sep, value = item.partition("=")
    if key.strip() not in MOVED:
        return item
    new = MOVED[key.strip()]
    print(f"raftlm: note: --set {key.strip()} is now {new} (the old name works until the next "
          "release)", file=sys.stderr)
    return f"{new}{sep}{value}"


def moved_names(raw: dict, source: str) -> dict:
    """`raw` with every name of `MOVED` at its new place (a one-line note each on stderr);
    ConfigError when both the old and the new name are set."""
    for old, new in MOVED.items():
        *old_path, old_key = old.split(".")
        parent = raw
        for part in old_path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_key not in parent:
            continue
        value = parent.pop(old_key)
        *new_path, new_key = new.split(".")
        node = raw
        for part in new_path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {part} must be a mapping (it holds {new})")
        if new_key in node:
            raise ConfigError(f"{source}: {old} and {new} are the same setting; keep {new}")
        node[new_key] = value
        print(f"raftlm: note: {source}: {old} is now {new} (the old name works until the next "
              "release)", file=sys.stderr)
    return raw
