"""Training objectives of the RAFT family (one table, `OBJECTIVES`), and the Rank step's
hand-over to training.

`training.objective` picks one (NumPy references: `raftlm.core_objectives`; torch per-token
losses: `raftlm.training.losses`):

| objective       | trains on                        | per response        | loss per token  |
|-----------------|----------------------------------|---------------------|-----------------|
| sft (default)   | selected responses               | -                   | -log pi         |
| reward_weighted | selected responses               | w = reward, or its  | -w log pi       |
|                 |                                  | per-prompt minmax   |                 |
|                 |                                  | or rank             |                 |
| raft++          | selected responses               | A = 1               | clipped ratio   |
| reinforce_rej   | all eligible; all-equal dropped  | A = r - mean(group) | clipped ratio   |
| grpo            | all eligible; all-equal dropped  | A = (r-mean)/std    | clipped ratio   |

Clipped ratio (PPO): -min(rho A, clip(rho, 1-eps, 1+eps_high) A) with rho = pi / pi_old per
token (pi_old: the policy that sampled, fixed for the stage's epochs; pi and pi_old at the
sampling temperature), and with a dual clip c, max(that, c A) where A < 0. Every loss is
aggregated over an optimizer step (`training.loss_aggregation`), plus `kl_coef` times the k3
penalty to pi_0 per token. Group objectives use only *eligible* candidates: a valid reward
that passed the response filters (`Selection.eligible`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raftlm.config import ConfigError, RaftConfig, TrainingConfig
from raftlm.core_objectives import group_advantages, overlong_penalty, transform_weights
from raftlm.rewards.selection import Selection
from raftlm.training.batches import Example
from raftlm.training.losses import clipped_ratio_loss, k3_kl, weighted_nll


@dataclass
class TrainingExample(Example):
    """An example with its per-response weight (reward weight or advantage) and, when the
    sampler recorded them, the sampling policy's log-probs of its response tokens."""

    weight: float = 1.0
    old_log_probs: list[float] | None = None


# rewards [P, K] (NaN: not eligible), config -> (weight or advantage [P, K], prompts kept [P])
Weights = Callable[[np.ndarray, TrainingConfig], tuple[np.ndarray, np.ndarray]]
# log pi [B, T], batch (mask, weights [B], old_log_probs), config -> (loss [B, T], token stats)
TokenLoss = Callable[[torch.Tensor, dict[str, torch.Tensor], TrainingConfig],
                     tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Objective:
    """One objective: what the Rank step hands to training and the per-token loss."""

    uses_ratio: bool  # compares with pi_old (the sampling policy): needs its log-probs
    trains_on_all_samples: bool  # a group objective: every eligible response of a prompt
    weights: Weights
    loss: TokenLoss


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


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(False, False, _unit_weights, _nll),
    "reward_weighted": Objective(False, False, _reward_weights, _weighted),
    "raft++": Objective(True, False, _unit_weights, _clipped),
    "reinforce_rej": Objective(True, True, _centred, _clipped),
    "grpo": Objective(True, True, _grpo_advantages, _clipped),
}


def check_objective_config(config: RaftConfig) -> None:
    """Settings the objective needs from other sections; raises ConfigError naming the field."""
    objective, k = config.training.objective, config.raft.samples_per_prompt
    if OBJECTIVES[objective].trains_on_all_samples and k < 2:
        raise ConfigError(f"raft.samples_per_prompt: expected >= 2 for training.objective="
                          f"{objective} (advantages compare K responses), got {k}")
    buffer = config.training.overlong_buffer
    if buffer > config.generation.max_new_tokens:
        raise ConfigError(f"training.overlong_buffer: expected <= generation.max_new_tokens "
                          f"({config.generation.max_new_tokens}), got {buffer}")


def sampling_mismatch(config: TrainingConfig, temperature: float, top_p: float, top_k: int
                      ) -> str | None:
    """The warning for a ratio or KL objective on truncated samples (top-p / top-k), or None.

    pi_old is the full softmax(z / T) the sampler recorded, while the samples came from its
    truncated renormalisation: the ratios are not exact importance weights (TRL and verl make
    the same approximation). Documented in docs/objectives.md.
    """
    if not (OBJECTIVES[config.objective].uses_ratio or config.kl_coef > 0):
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
    return temperature if OBJECTIVES[config.objective].uses_ratio else 1.0


def token_loss(config: TrainingConfig, log_probs: torch.Tensor, batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured objective's per-token loss [B, T] (plus `kl_coef` times the k3 penalty
    when `batch` holds `ref_log_probs`) and the micro-batch's statistics as sums over its
    response tokens: tokens, clipped, ratio_sum, ratio_max, kl.

    `batch` holds `mask`, `weights` [B] and, for ratio objectives, `old_log_probs` [B, T].
    """
    mask = batch["mask"]
    loss, token_stats = OBJECTIVES[config.objective].loss(log_probs, batch, config)
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
    weights = torch.tensor([getattr(e, "weight", 1.0) for e in examples], dtype=torch.float32)
    old = torch.zeros((len(examples), width), dtype=torch.float32)
    for row, example in enumerate(examples):
        recorded = getattr(example, "old_log_probs", None)
        if recorded is not None:
            start = len(example.prompt_ids) - 1
            old[row, start : start + len(recorded)] = torch.tensor(recorded, dtype=torch.float32)
    return {"weights": weights, "old_log_probs": old}


def shaped_rewards(rewards: np.ndarray, lengths: np.ndarray, config: TrainingConfig,
                   max_new_tokens: int) -> np.ndarray:
    """The [P, K] rewards plus DAPO's soft overlong penalty of each response's token length
    (`training.overlong_buffer`, `training.overlong_penalty`; unchanged when either is 0).
    NaN rewards stay NaN. The Rank step calls it before selection, for every objective."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return rewards + overlong_penalty(np.asarray(lengths), max_new_tokens,
                                      config.overlong_buffer, config.overlong_penalty)


def training_examples(
    prompts: list[Any],
    responses: list[list[Any]],
    rewards: np.ndarray,
    selection: Selection,
    config: TrainingConfig,
    stage: int,
) -> tuple[list[TrainingExample], dict[str, float | None]]:
    """The Rank step's output for the configured objective: the responses to train on, each
    with its weight or advantage (and recorded log-probs), plus the stage's rank statistics
    (`train/groups_dropped`, `train/n_examples`, `train/entropy`).

    Group objectives train on every eligible response (`selection.eligible`: a valid reward
    that passed the response filters) of the prompts they keep; the others on
    `selection.mask`. Weights and advantages are computed from eligible rewards only.

    `train/entropy` is -mean of the recorded token log-probs of all sampled responses: an
    estimate of the token entropy of the sampling distribution softmax(logits / T) (unbiased
    without top-p / top-k truncation); None when the sampler recorded none.
    """
    objective = OBJECTIVES[config.objective]
    rewards = np.asarray(rewards, dtype=np.float64)
    rewards = np.where(selection.eligible, rewards, np.nan)
    weights, keep = objective.weights(rewards, config)
    if objective.trains_on_all_samples:
        chosen = keep[:, None] & ~np.isnan(rewards)
    else:
        chosen = np.asarray(selection.mask, dtype=bool)
    if config.objective == "reward_weighted":
        negative = chosen & (weights < 0)
        if negative.any():
            p, j = (int(i[0]) for i in np.nonzero(negative))
            raise ConfigError(
                f"stage {stage}, prompt {prompts[p].id}: reward {rewards[p, j]:g} is a "
                "negative weight for reward_weighted; set training.weight_transform to "
                "minmax or rank"
            )
        # A weight-0 response carries no gradient: leave it out of the step (and of the
        # token count) instead of spending forward and backward passes on it.
        chosen = chosen & (weights != 0)
    examples = [
        TrainingExample(prompts[p].token_ids, responses[p][j].token_ids, float(weights[p, j]),
                        responses[p][j].token_log_probs)
        for p, j in zip(*np.nonzero(chosen))
    ]
    recorded = [lp for row in responses for r in row if (lp := r.token_log_probs) is not None]
    entropy = -float(np.mean(np.concatenate(recorded))) if recorded and any(
        len(lp) for lp in recorded) else None
    return examples, {
        "train/groups_dropped": int((~keep).sum()) if objective.trains_on_all_samples else 0,
        "train/n_examples": len(examples),
        "train/entropy": entropy,
    }
