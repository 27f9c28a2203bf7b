"""The sections of a run's configuration: plain dataclasses, every field with its default and
a one-line help (``raftlm train --help`` prints them). `raft_config.py` assembles them into
``RaftConfig`` and validates once, at load, naming the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raftlm.config.evaluation import TASKS, EvalConfig, EvalSet  # noqa: F401 (re-exported)
from raftlm.config.rewards import JudgeConfig, RewardConfig, RewardTerm  # noqa: F401 (re-exported)
from raftlm.config.schema import ConfigError, check_values, option
from raftlm.config.stages import AnchorConfig, ReplayConfig, Schedule
from raftlm.config.teaching import HintsConfig, TeacherConfig  # noqa: F401 (re-exported)
from raftlm.core.objectives import (
    ADVANTAGE_SCALES,
    LOSS_AGGREGATIONS,
    PAIR_RULES,
    ROLLOUT_CORRECTIONS,
)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
OBJECTIVES = ("sft", "reward_weighted", "raft++", "reinforce_rej", "grpo", "dpo", "rpo")
WEIGHTINGS = ("unit", "reward", "centred", "group_normalised", "pairs")
LOSSES = ("nll", "weighted_nll", "clipped_ratio", "dpo", "rpo")
COLLECTORS = ("fixed", "dynamic", "gvm")


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
    dtype: str = option("auto", "Weights' precision; auto: bf16 where the hardware runs it fast.",
                        choices=("auto", "fp32", "bf16"))
    gradient_checkpointing: bool = option(False, "Trade compute for activation memory.")
    cache_dir: str = option("~/.cache/raftlm", "Where GGUF models are converted to safetensors.")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    task: str | None = option(None, "Built-in task (prompts with an `answer` column); gsm8k "
                              "is shipped with raftlm (MIT): train split, test split held out.",
                              choices=TASKS)
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
    anchor: AnchorConfig | None = option(
        None, "A fixed SFT set (prompt and response columns) mixed into every stage's training "
        "examples (docs/recipes.md); null: none.")


@dataclass
class DynamicConfig:
    """raft.collector: dynamic (DAPO's dynamic sampling)."""

    max_rounds: int = option(4, "Most rounds of drawing and sampling a stage.")


@dataclass
class GvmConfig:
    """raft.collector: gvm (GVM-RAFT's allocation of the stage's samples)."""

    first_samples: int = option(4, "n0, first-round samples per prompt (its minimum).")
    max_samples: int = option(16, "Most samples per prompt.")
    budget: int = option(0, "Samples per stage, first round included; 0 = b x K.")
    accept_reward: float | None = option(
        None, "A response is accepted at this reward or above; null: selection.min_reward.")
    alpha: float = option(1e-3, "alpha in n_i ~ G_i / sqrt(p_i + alpha / p_i^(beta-1)).")
    beta: float = option(2.0, "beta in the same rule.")
    grad_norm: str = option(
        "logits", "G_i, from the recorded log-probs (logits: |d log pi / d logits|, "
        "docs/sampling.md) or none (1: acceptance rates alone).", choices=("logits", "none"))


@dataclass
class RaftStageConfig:
    stages: int = option(10, "T: number of RAFT stages.")
    prompts_per_stage: int = option(32, "b: prompts drawn per stage.")
    samples_per_prompt: int = option(8, "K: responses sampled per prompt.")
    collector: str = option(
        "fixed", "How a stage spends its samples (docs/sampling.md): fixed (b prompts x K); "
        "dynamic (draw more prompts, K each, until b carry a learning signal); gvm (GVM-RAFT: "
        "a first round, then the budget per prompt by acceptance rate and gradient norm); or "
        "pkg.mod:obj / file.py:obj naming a Collector of your own.",
        choices=COLLECTORS, import_path=True)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    gvm: GvmConfig = field(default_factory=GvmConfig)
    replay: ReplayConfig | None = option(
        None, "Also train each stage on kept responses of earlier stages (docs/recipes.md); "
        "null: the stage's own only.")
    hints: HintsConfig | None = option(
        None, "STaR hints for prompts nobody solved (docs/teaching.md); null: none.")


@dataclass
class VllmConfig:
    """generation.backend: vllm."""

    tensor_parallel_size: int = option(1, "Tensor-parallel GPUs.")
    gpu_memory_utilization: float = option(0.5, "GPU memory fraction.")


@dataclass
class GenerationConfig:
    backend: str = option("raftlm", "Sampler: raftlm's own is fastest; hf calls model.generate.",
                          choices=("raftlm", "hf", "vllm"))
    max_new_tokens: int = option(64, "Maximum tokens per response.")
    temperature: Schedule = option(
        1.0, "Sampling temperature (> 0); per stage: a list (the last repeats) or a ramp "
        "{start, end} (docs/recipes.md).")
    top_p: float = option(1.0, "Nucleus sampling mass; 1.0 disables.")
    top_k: int = option(0, "Sample among the k most likely tokens; 0 disables.")
    stop_strings: list[str] = option([], "Stop a response after any of these strings.")
    batch_size: int = option(64, "Sequences decoded together.")
    vllm: VllmConfig = field(default_factory=VllmConfig)
    teacher: TeacherConfig | None = option(
        None, "Another model samples a share of each prompt's K (docs/teaching.md); null: none.")


@dataclass
class RolloutConfig:
    """Multi-turn rollouts: the model calls tools or acts in an environment (docs/agents.md).
    Absent: one turn of text, as always."""

    tools: list[str] = option(
        [], "Tools the model may call: built-in (calculator), pkg.mod:fn or file.py:fn; typed "
        "functions with a docstring (their JSON schema is what the model is shown).")
    environment: str | None = option(
        None, "pkg.mod:Class / file.py:Class, one instance per trajectory: reset(**row) -> text "
        "| None, and either its public methods are tools or step(text) -> (observation, "
        "reward | None, done).")
    tool_choice: str = option(
        "auto", "auto: the model chooses; required: its first turn starts with a call's opening "
        "(prefilled, no loss), it writes the tool's name and arguments; a tool's name: starts "
        "with that tool's call, it writes the arguments (forced function calling, as OpenAI's "
        "tool_choice). Evaluation uses the same.")
    max_turns: int = option(4, "Most model turns per trajectory.")
    tool_timeout_s: float = option(10.0, "Seconds a tool call (or step) may take; longer is an "
                                   "error the model sees.")
    max_tool_output_tokens: int = option(256, "A tool's output is cut to this many tokens.")
    max_trajectory_tokens: int = option(
        512, "Most tokens after the prompt (model turns and observations together).")

    def check(self, where: str) -> None:
        """Raise ConfigError naming `where.field` for a value types alone do not rule out."""
        if not self.tools and not self.environment:
            raise ConfigError(f"{where}: set `tools` or `environment` (or remove `{where}` for "
                              "single-turn rollouts)")
        check_values(self, where, [
            ("max_turns", self.max_turns >= 1, ">= 1"),
            ("tool_timeout_s", self.tool_timeout_s > 0, "> 0"),
            ("max_tool_output_tokens", self.max_tool_output_tokens >= 1, ">= 1"),
            ("max_trajectory_tokens", self.max_trajectory_tokens >= 1, ">= 1"),
        ])


@dataclass
class SelectionConfig:
    strategy: str = option("best_per_prompt", "Which responses are kept (before the filters).",
                           choices=("best_per_prompt", "top_fraction", "top_k_per_prompt"))
    top_fraction: float = option(0.25, "top_fraction: share of all candidates kept.")
    top_k: int = option(1, "top_k_per_prompt: responses kept per prompt.")
    min_reward: Schedule | None = option(
        None, "Drop selected responses below this reward; per stage: a list (the last "
        "repeats) or a ramp {start, end} (docs/recipes.md).")
    drop_uniform_prompts: bool = option(
        False, "Drop prompts whose rewards are all equal among the responses the response "
        "filters (too short, truncated, reject_pattern) leave.")
    min_response_tokens: int = option(1, "Drop responses shorter than this.")
    drop_truncated: bool = option(False, "Drop responses cut at max_new_tokens (never stopped).")
    reject_pattern: str | None = option(None, "Drop responses matching this regex.")
    deduplicate: bool = option(True, "Keep one copy of identical responses to a prompt.")


@dataclass
class DpoConfig:
    """training.objective: dpo / rpo (iterative DPO on the stage's pairs; TRL's names)."""

    beta: float = option(0.1, "beta: how strongly the policy is tied to the reference (TRL's "
                         "beta, its default).")
    rpo_alpha: float | None = option(
        None, "Weight of the chosen responses' token-mean NLL added to the DPO loss (RPO); "
        "null: 0 for dpo, 1.0 for rpo.")
    pairs: str = option(
        "best_worst", "Pairs per prompt: best_worst (its best response against its worst, "
        "RLHFlow) or all_pairs (every two with different rewards, e.g. each correct x each "
        "incorrect, up to max_pairs); equal rewards give no pair.", choices=PAIR_RULES)
    max_pairs: int = option(4, "all_pairs: most pairs per prompt.")
    reference: str = option(
        "stage_start", "The reference: stage_start (the policy before the stage's first "
        "update, Iterative RPO) or initial (the LoRA base with the adapter off, RLHFlow; "
        "needs LoRA).", choices=("stage_start", "initial"))


@dataclass
class TrainingConfig:
    learning_rate: float = option(2e-4, "Peak learning rate (AdamW).")
    start: str = option(
        "continue", "What each stage trains from: the previous stage's policy and optimizer "
        "(continue), or the initial policy with a fresh optimizer and schedule (restart: "
        "ReST-EM, STaR; needs raft.replay of all stages).", choices=("continue", "restart"))
    weight_decay: float = option(0.0, "AdamW weight decay.")
    epochs: int = option(1, "E: passes over each stage's selected set.")
    micro_batch_size: int = option(8, "Examples per forward/backward.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    lr_scheduler: str = option("constant", "Learning-rate schedule; spans the whole run.",
                               choices=("constant", "linear", "cosine"))
    warmup_steps: int = option(0, "Linear warm-up steps at the start of the run.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 disables.")
    bf16_autocast: bool = option(
        False, "Train under bf16 autocast (fp32 weights kept; sampling keeps model.dtype): "
        "~2x faster steps on CPUs with AVX-512 bf16 and on GPUs.")
    objective: str = option("sft", "Fine-tuning objective (docs/objectives.md): a preset "
                            "(weighting, loss) pair.", choices=OBJECTIVES)
    weighting: str | None = option(
        None, "Replaces the objective's weighting: unit, reward, centred, group_normalised, "
        "pairs, or "
        "pkg.mod:obj / file.py:obj naming a Weighting; null: the objective's.",
        choices=WEIGHTINGS, import_path=True)
    loss: str | None = option(
        None, "Replaces the objective's loss: nll, weighted_nll, clipped_ratio, dpo, rpo, or "
        "pkg.mod:obj / file.py:obj naming a Loss; null: the objective's.",
        choices=LOSSES, import_path=True)
    clip_eps: float = option(0.2, "Ratio objectives: PPO clip range, rho in [1-eps, 1+eps].")
    dual_clip: float | None = option(None, "Ratio objectives: dual-clip constant c > 1 for "
                                     "negative advantages (e.g. 3); None disables.")
    weight_transform: str = option("none", "reward_weighted: the weight; none = the raw reward, "
                                   "minmax or rank per prompt.",
                                   choices=("none", "minmax", "rank"))
    kl_coef: float = option(0.0, "Weight of the k3 KL penalty to the initial policy (LoRA).")
    clip_eps_high: float | None = option(
        None, "Ratio objectives: upper clip, rho <= 1 + clip_eps_high (DAPO's clip-higher, "
        "e.g. 0.28); None = clip_eps.")
    loss_aggregation: str = option(
        "token_mean", "How a step's per-token losses are averaged: over all tokens, over "
        "responses of their token mean, or over responses of their token sum / "
        "loss_norm_tokens (Dr. GRPO).", choices=LOSS_AGGREGATIONS)
    loss_norm_tokens: int = option(0, "seq_mean_token_sum_norm: the constant token divisor; "
                                   "0 = generation.max_new_tokens.")
    advantage_scale: str = option(
        "group", "grpo: divide advantages by the std of the prompt's rewards (group), of all "
        "the stage's rewards (batch), or not at all (none: then grpo is reinforce_rej).",
        choices=ADVANTAGE_SCALES)
    group_std_ddof: int = option(1, "grpo: the std's delta degrees of freedom; 1 = unbiased, as "
                                 "TRL and verl; 0 = population std.")
    overlong_buffer: int = option(0, "DAPO's soft overlong penalty: the last N tokens before "
                                  "generation.max_new_tokens where the reward falls linearly; "
                                  "0 disables.")
    old_log_probs: str = option(
        "sampler", "Ratio objectives' pi_old: the log-probs the sampler recorded (sampler), or "
        "a training forward before the stage's first update (recompute: also logs the gap "
        "between the two as train/pi_old_gap and train/pi_old_kl).",
        choices=("sampler", "recompute"))
    rollout_correction: str = option(
        "none", "With old_log_probs recompute: weight each token by pi_old / pi_sampler, per "
        "token or per response, capped (truncate) or dropped above the cap (mask): TRL's "
        "vllm_importance_sampling_mode, verl's TIS/MIS.", choices=ROLLOUT_CORRECTIONS)
    rollout_correction_cap: float = option(
        3.0, "rollout_correction: the cap C on pi_old / pi_sampler (TRL's default).")
    mask_truncated: bool = option(
        False, "Responses cut at max_new_tokens stay in the statistics (group mean and std, "
        "selection) but get no loss (TRL's mask_truncated_completions, DAPO); "
        "selection.drop_truncated removes them from the statistics too.")
    overlong_penalty: float = option(1.0, "The overlong penalty at max_new_tokens (subtracted "
                                     "from the reward before ranking); 0 disables.")
    dpo: DpoConfig = field(default_factory=DpoConfig)


@dataclass
class TrackingConfig:
    tensorboard: bool = option(False, "Also log to TensorBoard (run_dir/tensorboard).")
    wandb: bool = option(False, "Also log to Weights & Biases.")
    wandb_project: str = option("raftlm", "W&B project name.")
    report: bool = option(True, "Write report.html at the end of the run.")
    log_completions: int = option(0, "Every N stages, a table of the stage's sampled completions "
                                  "(prompt, response, each term's reward, selected) to W&B and "
                                  "TensorBoard; 0 = never.")
