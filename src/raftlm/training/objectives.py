"""Training objectives of the RAFT family, and the Rank step's hand-over to training.

`training.objective` picks one (NumPy references with the same names: `raftlm.core_objectives`):

| objective       | trains on                        | per response        | loss per token  |
|-----------------|----------------------------------|---------------------|-----------------|
| sft (default)   | selected responses               | -                   | -log pi         |
| reward_weighted | selected responses               | w = reward, or its  | -w log pi       |
|                 |                                  | per-prompt minmax   |                 |
|                 |                                  | or rank             |                 |
| raft++          | selected responses               | A = 1               | clipped ratio   |
| reinforce_rej   | all K; all-equal groups dropped  | A = r - mean(group) | clipped ratio   |
| grpo            | all K; all-equal groups dropped  | A = (r-mean)/std    | clipped ratio   |

Clipped ratio (PPO): -min(rho A, clip(rho, 1-eps, 1+eps) A) with rho = pi / pi_old per token
(pi_old: the policy that sampled, fixed for the stage's epochs), and with a dual clip c,
max(that, c A) where A < 0. Every loss is token-pooled over an optimizer step, as the SFT loss,
plus `kl_coef` times the k3 estimate of KL(pi || pi_0) per token.

Token tensors are [B, T] aligned with `raftlm.training.batches.token_nll` (0 where masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raftlm.config import TrainingConfig
from raftlm.core_objectives import group_advantages, transform_weights
from raftlm.rewards.selection import Selection
from raftlm.training.batches import Example

RATIO_OBJECTIVES = ("raft++", "reinforce_rej", "grpo")
GROUP_OBJECTIVES = ("reinforce_rej", "grpo")


@dataclass
class TrainingExample(Example):
    """An example with its per-response weight (reward weight or advantage) and, when the
    sampler recorded them, the sampling policy's log-probs of its response tokens."""

    weight: float = 1.0
    old_log_probs: list[float] | None = None


def weighted_nll(log_probs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
    """Per-token -w_i log pi(y_it) ([B, T]; w = 1 is SFT)."""
    return -weights[:, None] * log_probs * mask


def clipped_ratio_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss [B, T], the ratio and where the clip was active."""
    ratio = torch.exp(log_probs - old_log_probs)
    adv = advantages[:, None].expand_as(ratio)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss * mask, ratio.detach(), (clipped > unclipped).detach()


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor
          ) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_log_probs - log_probs
    return (torch.exp(delta) - delta - 1) * mask


def token_loss(config: TrainingConfig, log_probs: torch.Tensor, batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured objective's per-token loss [B, T] and its per-token statistics.

    `batch` holds `mask`, `weights` [B] and, for ratio objectives, `old_log_probs` [B, T].
    """
    mask = batch["mask"]
    if config.objective in RATIO_OBJECTIVES:
        loss, ratio, clipped = clipped_ratio_loss(
            log_probs, batch["old_log_probs"], batch["weights"], mask, config.clip_eps,
            config.dual_clip,
        )
        stats = {"ratio": ratio, "clipped": clipped}
    elif config.objective == "sft":
        loss, stats = -log_probs * mask, {}
    else:
        loss, stats = weighted_nll(log_probs, batch["weights"], mask), {}
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

    `train/entropy` is -mean of the recorded token log-probs of all sampled responses (an
    unbiased token-entropy estimate when sampling at temperature 1, a cross-entropy of the
    sampler against the policy otherwise); None when the sampler recorded none.
    """
    objective = config.objective
    groups_dropped = 0
    if objective in GROUP_OBJECTIVES:
        advantages, keep = group_advantages(rewards, normalize=objective == "grpo")
        chosen = keep[:, None] & ~np.isnan(rewards)
        weights = advantages
        groups_dropped = int((~keep).sum())
    else:
        chosen = selection.mask
        weights = np.ones_like(rewards)
        if objective == "reward_weighted":
            weights = transform_weights(rewards, config.weight_transform)
            negative = chosen & (weights < 0)
            if negative.any():
                p, j = (int(i[0]) for i in np.nonzero(negative))
                raise ValueError(
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
        "train/groups_dropped": groups_dropped,
        "train/n_examples": len(examples),
        "train/entropy": entropy,
    }
