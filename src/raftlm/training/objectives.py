"""Training objectives of the RAFT family: a weighting (what each kept response counts for)
times a per-token loss, two registries picked independently as verl picks `adv_estimator` and
`policy_loss.loss_mode`; `training.objective` names a preset pair (NumPy references:
`raftlm.core.objectives`; torch per-token losses: `raftlm.training.losses`):

| objective (preset) | weighting          | trains on                       | loss            |
|--------------------|--------------------|---------------------------------|-----------------|
| sft (default)      | unit               | selected responses              | nll             |
| reward_weighted    | reward: w = reward | selected responses              | weighted_nll    |
|                    | (or its per-prompt |                                 |                 |
|                    | minmax or rank)    |                                 |                 |
| raft++             | unit: A = 1        | selected responses              | clipped_ratio   |
| reinforce_rej      | centred: r - mean  | all eligible; all-equal dropped | clipped_ratio   |
| grpo               | group_normalised:  | all eligible; all-equal dropped | clipped_ratio   |
|                    | (r - mean) / std   |                                 |                 |
| dpo                | pairs: (chosen,    | pairs of eligible responses     | dpo             |
| rpo                | rejected) per      | with different rewards          | rpo: dpo + NLL  |
|                    | prompt             | (`training.dpo.pairs`)          | of the chosen   |

`training.weighting` / `training.loss` override the preset's half (a name of the table, or
`pkg.mod:obj` / `file.py:obj` naming a `Weighting` / `Loss` record of your own).

Clipped ratio (PPO): -min(rho A, clip(rho, 1-eps, 1+eps_high) A) with rho = pi / pi_old per
token (pi_old: the policy that sampled, fixed for the stage's epochs; pi and pi_old at the
sampling temperature), and with a dual clip c, max(that, c A) where A < 0. Every loss is
aggregated over an optimizer step (`training.loss_aggregation`), plus `kl_coef` times the k3
penalty to pi_0 per token. DPO (`raftlm.training.pairs`) is TRL's sigmoid loss on summed
response log-probs against a reference (`training.dpo`), a mean over pairs. Group weightings
and pairings use only *eligible* candidates: a valid reward that passed the response filters
(`raftlm.stage.rank.Selection.eligible`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raftlm.config import ConfigError, RaftConfig, TrainingConfig
from raftlm.config.registry import lookup
from raftlm.core.objectives import (
    group_advantages,
    preference_pairs,
    rollout_correction,
    transform_weights,
)
from raftlm.training.batches import Example, PairExample
from raftlm.training.losses import clipped_ratio_loss, k3_kl, weighted_nll
from raftlm.training.pairs import REFERENCES, pair_loss

__all__ = ["LOSSES", "OBJECTIVES", "WEIGHTINGS", "Loss", "Objective", "Weighting",
           "objective_of"]

# rewards [P, K] (NaN: not eligible), config -> (weight or advantage [P, K], prompts kept [P])
Weights = Callable[[np.ndarray, TrainingConfig], tuple[np.ndarray, np.ndarray]]
# log pi [B, T], batch (mask, weights [B], old_log_probs), config -> (loss [B, T], token stats)
TokenLoss = Callable[[torch.Tensor, dict[str, torch.Tensor], TrainingConfig],
                     tuple[torch.Tensor, dict[str, torch.Tensor]]]
# rewards [P, K] (NaN: not eligible, or a repeat), config -> (prompt, chosen, rejected) [N, 3]
Pairs = Callable[[np.ndarray, TrainingConfig], np.ndarray]
# log pi [2N, T] (`batches.sequences` rows), mask, N pairs, config, the step's denominator per
# pair -> (loss numerator, pair stats)
PairLoss = Callable[[torch.Tensor, torch.Tensor, list[PairExample], TrainingConfig, float],
                    tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Weighting:
    """What each response the Rank step keeps counts for: a weight or an advantage."""

    weights: Weights | None  # None for a pairing
    # Compares a prompt's responses with each other: trains on every eligible response of the
    # prompts whose rewards differ (all-equal groups are dropped), not on the selection.
    group: bool = False
    # Weights multiply the log-likelihood: a negative one is refused, a zero one left out.
    nonnegative: bool = False
    # Pairs a prompt's responses (chosen, rejected) for a paired loss instead of weighting them.
    pairs: Pairs | None = None


@dataclass(frozen=True)
class Loss:
    """The per-token loss of a response, given its weight or advantage."""

    loss: TokenLoss | None  # None for a paired loss
    uses_ratio: bool = False  # compares with pi_old (the sampling policy): needs its log-probs
    plain_nll: bool = False  # exactly -log pi per token, whatever the weight (the fast path)
    # A loss on (chosen, rejected) pairs of summed log-probs instead of per token (DPO).
    paired: PairLoss | None = None


@dataclass(frozen=True)
class Objective:
    """A weighting and a loss: what the Rank step hands to training, and how it trains."""

    weighting: Weighting
    loss: Loss


def _unit_weights(rewards: np.ndarray, config: TrainingConfig) -> tuple[np.ndarray, np.ndarray]:
    return np.ones_like(rewards), np.ones(len(rewards), dtype=bool)


def _reward_weights(rewards: np.ndarray, config: TrainingConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
    return transform_weights(rewards, config.weight_transform), np.ones(len(rewards), dtype=bool)


def _centred(rewards: np.ndarray, config: TrainingConfig) -> tuple[np.ndarray, np.ndarray]:
    return group_advantages(rewards, scale="none")


def _grpo_advantages(rewards: np.ndarray, config: TrainingConfig
                     ) -> tuple[np.ndarray, np.ndarray]:
    return group_advantages(rewards, scale=config.advantage_scale, ddof=config.group_std_ddof)


def _nll(log_probs: torch.Tensor, batch: dict[str, torch.Tensor], config: TrainingConfig
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return -log_probs * batch["mask"], {}


def _weighted(log_probs: torch.Tensor, batch: dict[str, torch.Tensor], config: TrainingConfig
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return weighted_nll(log_probs, batch["weights"], batch["mask"]), {}


def _clipped(log_probs: torch.Tensor, batch: dict[str, torch.Tensor], config: TrainingConfig
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, ratio, clipped = clipped_ratio_loss(
        log_probs, batch["old_log_probs"], batch["weights"], batch["mask"], config.clip_eps,
        config.dual_clip, config.clip_eps_high)
    return loss, {"ratio": ratio, "clipped": clipped}


def _pairs(rewards: np.ndarray, config: TrainingConfig) -> np.ndarray:
    return preference_pairs(rewards, config.dpo.pairs, config.dpo.max_pairs)


def _dpo(rpo_alpha: float) -> PairLoss:
    """The paired loss with `rpo_alpha` as its NLL weight unless `training.dpo.rpo_alpha` says
    otherwise (dpo: 0, rpo: 1.0, the value TRL's docs suggest)."""
    def loss(log_probs: torch.Tensor, mask: torch.Tensor, pairs: list[PairExample],
             config: TrainingConfig, per_pair: float) -> tuple[torch.Tensor, dict[str, float]]:
        alpha = rpo_alpha if config.dpo.rpo_alpha is None else config.dpo.rpo_alpha
        return pair_loss(log_probs, mask, pairs, config.dpo.beta, alpha, per_pair)
    return loss


WEIGHTINGS: dict[str, Weighting] = {
    "unit": Weighting(_unit_weights),
    "reward": Weighting(_reward_weights, nonnegative=True),
    "centred": Weighting(_centred, group=True),
    "group_normalised": Weighting(_grpo_advantages, group=True),
    "pairs": Weighting(None, pairs=_pairs),
}
LOSSES: dict[str, Loss] = {
    "nll": Loss(_nll, plain_nll=True),
    "weighted_nll": Loss(_weighted),
    "clipped_ratio": Loss(_clipped, uses_ratio=True),
    "dpo": Loss(None, paired=_dpo(0.0)),
    "rpo": Loss(None, paired=_dpo(1.0)),
}
# `training.objective`: each name a (weighting, loss) pair.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "sft": ("unit", "nll"),
    "reward_weighted": ("reward", "weighted_nll"),
    "raft++": ("unit", "clipped_ratio"),
    "reinforce_rej": ("centred", "clipped_ratio"),
    "grpo": ("group_normalised", "clipped_ratio"),
    "dpo": ("pairs", "dpo"),
    "rpo": ("pairs", "rpo"),
}


def objective_of(config: TrainingConfig) -> Objective:
    """The configured weighting and loss: `training.objective`'s pair, either half replaced
    by `training.weighting` / `training.loss` when set."""
    weighting, loss = OBJECTIVES[config.objective]
    return Objective(
        lookup(WEIGHTINGS, config.weighting or weighting, "training.weighting", Weighting),
        lookup(LOSSES, config.loss or loss, "training.loss", Loss))


def check_objective_config(config: RaftConfig) -> None:
    """Settings the objective needs from other sections; raises ConfigError naming the field."""
    objective, k = objective_of(config.training), config.raft.samples_per_prompt
    if (objective.weighting.group or objective.weighting.pairs) and k < 2:
        raise ConfigError(f"raft.samples_per_prompt: expected >= 2 for training.objective="
                          f"{config.training.objective} (advantages compare K responses), "
                          f"got {k}")
    training = config.training
    if (objective.weighting.nonnegative and training.weight_transform == "none"
            and training.overlong_buffer > 0 and training.overlong_penalty > 0):
        # The penalty is subtracted from the reward before weighting: a correct but long answer
        # would get a negative weight mid-run, quoting a shaped reward the user never sees.
        raise ConfigError("training.weight_transform: expected minmax or rank with the overlong "
                          f"penalty (training.overlong_buffer={training.overlong_buffer}): "
                          f"{training.objective} weights by the shaped reward, which the "
                          "penalty can make negative; got none")
    if training.old_log_probs == "recompute" and not objective.loss.uses_ratio:
        raise ConfigError("training.old_log_probs: expected sampler for training.objective="
                          f"{training.objective} (its loss has no pi_old), got recompute")
    if training.rollout_correction != "none" and training.old_log_probs != "recompute":
        raise ConfigError(f"training.rollout_correction: expected none with "
                          "training.old_log_probs=sampler (it weighs pi_old recomputed by "
                          f"training against the sampler's), got {training.rollout_correction}")
    _check_paired(config)
    buffer = config.training.overlong_buffer
    if buffer > config.generation.max_new_tokens:
        raise ConfigError(f"training.overlong_buffer: expected <= generation.max_new_tokens "
                          f"({config.generation.max_new_tokens}), got {buffer}")


def _check_paired(config: RaftConfig) -> None:
    """A paired loss trains on a pairing's pairs, and only there; its knobs and what it makes
    meaningless are checked here (ConfigError naming the field)."""
    training, dpo = config.training, config.training.dpo
    objective = objective_of(training)
    paired, pairing = objective.loss.paired is not None, objective.weighting.pairs is not None
    weighting, loss = (mine or preset for mine, preset in
                       zip((training.weighting, training.loss), OBJECTIVES[training.objective]))
    if paired and not pairing:
        raise ConfigError(f"training.weighting: expected pairs with training.loss={loss} (a "
                          f"paired loss trains on pairs), got {weighting}")
    if pairing and not paired:
        raise ConfigError(f"training.loss: expected a paired loss (dpo, rpo) with "
                          f"training.weighting={weighting}, got {loss}")
    if not paired:
        return
    name = f"training.objective={training.objective}"
    for field, ok, expected in [
        ("training.dpo.beta", dpo.beta > 0, "> 0"),
        ("training.dpo.rpo_alpha", dpo.rpo_alpha is None or dpo.rpo_alpha >= 0, ">= 0 or null"),
        ("training.dpo.max_pairs", dpo.max_pairs >= 1, ">= 1"),
        ("training.dpo.reference", not REFERENCES[dpo.reference].adapter_off
         or config.model.lora.enabled, "stage_start without LoRA (initial is the base with "
         "the adapter off; a frozen copy of the weights is not kept)"),
        ("training.kl_coef", training.kl_coef == 0, f"0 with {name} (beta already ties it to "
         "training.dpo.reference)"),
        ("training.loss_aggregation", training.loss_aggregation == "token_mean",
         f"token_mean with {name} (a mean over pairs plus rpo_alpha x the chosen tokens' mean "
         "NLL, as TRL)"),
        ("training.mask_truncated", not training.mask_truncated, f"false with {name} (use "
         "selection.drop_truncated: a truncated response is then in no pair)"),
        ("selection.strategy", config.selection.strategy == "best_per_prompt",
         f"best_per_prompt (unused) with {name}: training.dpo.pairs picks the pairs"),
    ]:
        if not ok:
            got = config
            for part in field.split("."):
                got = getattr(got, part)
            raise ConfigError(f"{field}: expected {expected}, got {got!r}")


def sampling_mismatch(config: TrainingConfig, temperature: float, top_p: float, top_k: int
                      ) -> str | None:
    """The warning for a ratio or KL objective on truncated samples (top-p / top-k), or None.

    pi_old is the full softmax(z / T) the sampler recorded, while the samples came from its
    truncated renormalisation: the ratios are not exact importance weights (TRL and verl make
    the same approximation). Documented in docs/objectives.md.
    """
    if not (objective_of(config).loss.uses_ratio or config.kl_coef > 0):
        return None
    if top_p >= 1 and top_k == 0:
        return None
    return (f"training.objective={config.objective} with generation.top_p={top_p:g}, "
            f"top_k={top_k}: pi and pi_old are the untruncated softmax(logits / {temperature:g}),"
            " the samples the truncated one (docs/objectives.md)")


def training_temperature(config: TrainingConfig, temperature: float) -> float:
    """Temperature of pi (and pi_0 for the KL term) in training: the sampling one for ratio
    objectives, whose pi_old the sampler recorded at it; 1 (plain NLL) for sft and
    reward_weighted."""
    return temperature if objective_of(config).loss.uses_ratio else 1.0


def token_loss(config: TrainingConfig, log_probs: torch.Tensor, batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured objective's per-token loss [B, T] (plus `kl_coef` times the k3 penalty
    when `batch` holds `ref_log_probs`) and the micro-batch's statistics as sums over its
    response tokens: tokens, clipped, ratio_sum, ratio_max, kl.

    Unpaired losses only (a paired one is `Loss.paired`). `batch` holds `mask`, `weights` [B]
    and, for ratio objectives, `old_log_probs` [B, T]
    and, with `training.rollout_correction`, `correction` [B, T] (pi_old / pi_sampler).
    """
    mask = batch["mask"]
    loss, token_stats = objective_of(config).loss.loss(log_probs, batch, config)
    if "correction" in batch:  # rollout correction: a constant weight per token
        loss = loss * batch["correction"]
    real = mask.bool()
    stats = {"tokens": float(mask.sum())}
    if "ref_log_probs" in batch and config.kl_coef > 0:
        kl = k3_kl(log_probs, batch["ref_log_probs"], mask)
        loss = loss + config.kl_coef * kl
        stats["kl"] = float(kl.detach().sum())
    if "ratio" in token_stats:
        ratio = token_stats["ratio"][real]
        stats["clipped"] = float(token_stats["clipped"][real].sum())
        stats["ratio_sum"] = float(ratio.sum())
        stats["ratio_max"] = float(ratio.max()) if ratio.numel() else 0.0
    return loss, stats


def token_tensors(examples: list[Example], width: int) -> dict[str, torch.Tensor]:
    """Per-response weights [B] and recorded old log-probs [B, width] laid out like
    `token_nll` (response token t of a row at position len(prompt) - 1 + t; 0 elsewhere)."""
    # A plain Example (no weight, nothing recorded) trains with weight 1.
    weights = torch.tensor([getattr(e, "weight", 1.0) for e in examples], dtype=torch.float32)
    old = torch.zeros((len(examples), width), dtype=torch.float32)
    correction = torch.ones((len(examples), width), dtype=torch.float32)
    for row, example in enumerate(examples):
        start = len(example.prompt_ids) - 1
        for table, values in ((old, getattr(example, "old_log_probs", None)),
                              (correction, getattr(example, "correction", None))):
            if values is not None:
                table[row, start : start + len(values)] = torch.tensor(values,
                                                                       dtype=torch.float32)
    out = {"weights": weights, "old_log_probs": old}
    if any(getattr(e, "correction", None) is not None for e in examples):
        out["correction"] = correction
    return out


def sampler_gap(examples: list[Example], train_log_probs: list[np.ndarray],
                config: TrainingConfig) -> dict[str, float]:
    """The gap between the log-probs the sampler recorded and a training forward of the same
    tokens (the model's own tokens, `loss_mask`): `train/pi_old_gap` the mean |difference|,
    `train/pi_old_kl` the mean of log pi_sampler - log pi_train (an estimate of
    KL(pi_sampler || pi_train) on the sampler's own samples). With `training.rollout_correction`
    each example gets its correction weights (`core.objectives.rollout_correction`) and
    `train/rollout_correction_mean` / `_zeroed` say what they did. Responses without recorded
    log-probs (vllm) have no gap and get no correction."""
    diffs, weights = [], []
    for example, train in zip(examples, train_log_probs):
        sampler = getattr(example, "old_log_probs", None)
        if sampler is None:
            continue
        sampler = np.asarray(sampler, dtype=np.float64)[: len(train)]
        own = np.ones(len(train), dtype=bool) if getattr(example, "loss_mask", None) is None \
            else np.asarray(example.loss_mask, dtype=bool)[: len(train)]
        diffs.append((sampler - train)[own])
        if config.rollout_correction != "none":
            correction = rollout_correction(train[None], sampler[None], own[None],
                                            config.rollout_correction,
                                            config.rollout_correction_cap)[0]
            example.correction = correction.tolist()
            weights.append(correction[own])
    if not diffs or not sum(len(d) for d in diffs):
        return {}
    every = np.concatenate(diffs)
    stats = {"train/pi_old_gap": float(np.mean(np.abs(every))),
             "train/pi_old_kl": float(np.mean(every))}
    if weights:
        applied = np.concatenate(weights)
        stats.update({"train/rollout_correction_mean": float(applied.mean()),
                      "train/rollout_correction_zeroed": float(np.mean(applied == 0))})
    return stats
