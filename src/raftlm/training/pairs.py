"""The paired losses (dpo, rpo) in training, as TRL's DPOTrainer computes them: the reference
policy's summed log-probs of every pair once per stage, before its first update, and the loss
of a micro-batch of pairs (loss_type sigmoid; RPO adds rpo_alpha times loss_type sft).

NumPy references: `raftlm.core.objectives.dpo_loss` (the loss and TRL's rewards/* metrics) and
`raftlm.core.objectives.preference_pairs` (which responses the Rank step pairs).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from raftlm.config import TrainingConfig
from raftlm.training.batches import PairExample, response_log_probs, sequences
from raftlm.training.losses import dpo_loss


@dataclass(frozen=True)
class Reference:
    """The policy DPO's implicit rewards compare with (`training.dpo.reference`)."""

    # The LoRA base with the adapter disabled: the initial policy, at no copy of the weights
    # (refused without LoRA); else the policy as it is before the stage's first update.
    adapter_off: bool


REFERENCES: dict[str, Reference] = {
    "stage_start": Reference(adapter_off=False),
    "initial": Reference(adapter_off=True),
}

# The per-pass sums a trainer keeps for `pair_metrics`.
PAIR_STATS = ("pairs", "rewards_chosen", "rewards_rejected", "rewards_accurate")


def set_reference_log_probs(model: Any, pairs: list[PairExample], pad_id: int,
                            device: torch.device, config: TrainingConfig) -> None:
    """Set each pair's `ref_chosen` / `ref_rejected`: the summed log-probs of its responses'
    own tokens (`loss_mask`) under the reference policy, at temperature 1 in eval mode."""
    reference = REFERENCES[config.dpo.reference]
    with model.disable_adapter() if reference.adapter_off else nullcontext():
        log_probs = response_log_probs(model, sequences(pairs), pad_id,
                                       config.micro_batch_size, device)
    sums = [float(np.sum(values, dtype=np.float64)) for values in log_probs]
    for pair, chosen, rejected in zip(pairs, sums[0::2], sums[1::2]):
        pair.ref_chosen, pair.ref_rejected = chosen, rejected


def pair_loss(log_probs: torch.Tensor, mask: torch.Tensor, pairs: list[PairExample],
              beta: float, rpo_alpha: float, per_pair: float
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's share of an optimizer step's loss, from the log-probs [2N, T] of its
    N pairs laid out as `sequences` does: `per_pair` times the sum of the pairs' DPO losses plus
    `rpo_alpha` times the chosen tokens' summed NLL. The step divides the sum of these by its
    chosen tokens (`per_pair` is that count over the step's pairs): the DPO loss's mean over the
    step's pairs plus rpo_alpha times the chosen tokens' mean NLL. Stats: sums over the pairs."""
    summed = (log_probs * mask).sum(dim=1)
    ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=summed.dtype,
                       device=summed.device)
    losses, chosen, rejected = dpo_loss(summed[0::2], summed[1::2], ref[:, 0], ref[:, 1], beta)
    loss = per_pair * losses.sum()
    if rpo_alpha:
        loss = loss - rpo_alpha * summed[0::2].sum()
    return loss, {"pairs": float(len(pairs)), "rewards_chosen": float(chosen.sum()),
                  "rewards_rejected": float(rejected.sum()),
                  "rewards_accurate": float((chosen > rejected).sum())}


def pair_metrics(accelerator: Accelerator, stats: dict[str, float]) -> dict[str, float]:
    """TRL's rewards/* over the stage's passes and all processes: the mean implicit rewards of
    chosen and rejected responses, their margin, and the share of pairs whose chosen one is
    ahead (`train/rewards_accuracy`)."""
    sums = accelerator.reduce(torch.tensor([stats[k] for k in PAIR_STATS],
                                           device=accelerator.device), "sum").tolist()
    pairs, chosen, rejected, accurate = sums
    if not pairs:
        return {}
    return {"train/rewards_chosen": chosen / pairs, "train/rewards_rejected": rejected / pairs,
            "train/rewards_margin": (chosen - rejected) / pairs,
            "train/rewards_accuracy": accurate / pairs}
