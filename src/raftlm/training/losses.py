"""Per-token losses of the RAFT family in torch; `raftlm.core.objectives` holds the NumPy twins
(same names, same clamps) they are tested against.

Token tensors are [B, T] aligned with `raftlm.training.batches.token_nll` (0 where masked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raftlm.core.objectives import K3_CLAMP, LOG_RATIO_CLAMP


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
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss [B, T], the ratio and where the clip was active.

    The log-ratio is clamped to [-20, 20] before exp (as verl): a token whose pi_old was tiny
    would otherwise give rho = inf and, with a negative advantage, an infinite loss.
    """
    log_ratio = torch.clamp(log_probs - old_log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages[:, None].expand_as(ratio)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss * mask, ratio.detach(), (clipped > unclipped).detach()


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor
          ) -> torch.Tensor:
    """Per-token k3 penalty exp(d) - d - 1, d = ref - logp: its value estimates KL(pi || pi_ref)
    on samples of pi, its gradient is that of KL(pi_ref || pi) (as GRPO, TRL and verl). d is
    clamped to [-20, 20] and the value to [-10, 10], as verl's low_var_kl."""
    delta = torch.clamp(ref_log_probs - log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(delta) - delta - 1, -K3_CLAMP, K3_CLAMP) * mask


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss [N] -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) from
    summed response log-probs [N] (TRL's loss_type sigmoid), and the implicit rewards
    beta (pi - ref) of the chosen and rejected responses (detached)."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return (-F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(),
            rejected_rewards.detach())


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm_tokens: int
              ) -> torch.Tensor:
    """The numerator of one optimizer step's loss from a micro-batch's per-token losses.

    The step divides the sum of its micro-batches' numerators by `step_denominator` (over all
    processes), which gives `raftlm.core.objectives.aggregate_loss` of the whole step.
    """
    if mode == "token_mean":
        return per_token.sum()
    if mode == "seq_mean_token_mean":
        return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    return per_token.sum() / norm_tokens  # seq_mean_token_sum_norm


def step_denominator(mode: str, tokens: int, sequences: int) -> int:
    """What a step's summed numerators are divided by: its token count (token_mean) or its
    number of responses (the sequence-mean aggregations)."""
    return tokens if mode == "token_mean" else sequences
