"""The `evaluation` section: the held-out set's settings and `evaluation.sets`, one more
evaluation set each (docs/evaluation.md), with their checks beside them."""

from __future__ import annotations

from dataclasses import dataclass, field

from raftlm.config.schema import ConfigError, check_values, option

TASKS = ("arithmetic", "larger", "multiplication", "gsm8k")  # = data.tasks.TASKS
EXTRACTIONS = ("auto", "strict", "lenient", "math_verify", "reward")  # = evaluation.extraction's
EVAL_METRICS = ("accuracy", "avg@n", "maj@n", "pass@k", "reward", "tokens")


@dataclass
class EvalSet:
    """One more evaluation set (docs/evaluation.md); logged as eval/<name>/<metric>."""

    name: str = option("", "The set's name in metrics: eval/<name>/accuracy, ...")
    task: str | None = option(None, "A built-in task's held-out split (gsm8k: its test set).",
                              choices=TASKS)
    file: str | None = option(None, "A prompt file (.jsonl, .json, .csv, .parquet); "
                              "data.prompt_field holds the prompt.")
    size: int = option(0, "Use the first N prompts; 0 = all.")
    shots: int = option(0, "task: k-shot, the task's first k train problems as earlier turns.")
    extraction: list[str] = option(
        ["auto"], "How a response's answer is read and judged, one or more of auto, strict, "
        "lenient, math_verify, reward; the first names the plain metrics, the others add "
        "_<rule> (accuracy_lenient).", choices=EXTRACTIONS)
    samples: int = option(0, "n sampled responses per prompt for avg@n, maj@n and pass@k "
                          "(every k <= n); 0 = greedy only.")
    temperature: float | None = option(None, "Sampling temperature; None = generation's.")
    max_new_tokens: int | None = option(None, "Response cap; None = evaluation.max_new_tokens.")
    metrics: list[str] = option(
        ["accuracy", "avg@n", "maj@n", "pass@k", "tokens"], "Which metrics: accuracy "
        "(greedy), avg@n, maj@n, pass@k, reward (the run's reward), tokens.",
        choices=EVAL_METRICS)

    def check(self, where: str) -> None:
        """Raise ConfigError naming `where.field` for a value types alone do not rule out."""
        sources = [key for key in ("task", "file") if getattr(self, key)]
        if len(sources) != 1:
            raise ConfigError(f"{where}: expected exactly one of `task`, `file`, got "
                              f"{sources or 'none'}")
        check_values(self, where, [
            ("name", bool(self.name) and "/" not in self.name, "a name without '/'"),
            ("size", self.size >= 0, ">= 0"),
            ("shots", self.shots >= 0 and (self.shots == 0 or bool(self.task)),
             ">= 0, and 0 unless the set is a task"),
            ("extraction", bool(self.extraction), "at least one rule"),
            ("samples", self.samples >= 0, ">= 0"),
            ("temperature", self.temperature is None or self.temperature > 0, "> 0 or null"),
            ("max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 1,
             ">= 1 or null"),
        ])


@dataclass
class EvalConfig:
    enabled: bool = option(True, "Evaluate before stage 1 and after every stage.")
    sampled: bool = option(True, "Also sample K responses per held-out prompt (diversity, KL).")
    samples_per_prompt: int = option(4, "Samples per held-out prompt for sampled metrics.")
    kl_responses: int = option(64, "Responses the KL estimate uses (a forward each); 0 = all.")
    max_new_tokens: int | None = option(None, "Eval response cap; None = generation's.")
    every: int = option(1, "Evaluate after every N-th stage (stage 0 and the last always).")
    sampled_every: int = option(
        0, "Sampled metrics (every set's samples, the KL, diversity) at the evaluated "
        "stages that are multiples of N; 0 = at the last stage only, which always gets them.")
    extraction: list[str] = option(
        ["auto"], "The held-out set's answer rules (as evaluation.sets[].extraction); auto: "
        "the reward's built-in check, else the last number where every answer is a number.",
        choices=EXTRACTIONS)
    correct_reward: float = option(1.0, "extraction `reward`: a response is correct at this "
                                   "reward or above.")
    sets: list[EvalSet] = field(
        default_factory=list,
        metadata={"help": "More evaluation sets, after the held-out one (docs/evaluation.md)."})

    def check(self, where: str = "evaluation") -> None:
        """Raise ConfigError naming the field: each set's values, and names used once."""
        if not self.extraction:
            raise ConfigError(f"{where}.extraction: expected at least one rule, got []")
        if self.sampled_every < 0:
            raise ConfigError(f"{where}.sampled_every: expected >= 0, got {self.sampled_every}")
        names = set()
        for i, eval_set in enumerate(self.sets):
            eval_set.check(f"{where}.sets[{i}]")
            if eval_set.name in names:
                raise ConfigError(f"{where}.sets[{i}].name: {eval_set.name!r} is used twice")
            names.add(eval_set.name)

    def samples_at(self, stage: int, last: int) -> bool:
        """Whether stage `stage` (of `last`) gets the sampled metrics (`sampled_every`)."""
        every = self.sampled_every
        return stage == last or (every > 0 and stage % every == 0)
