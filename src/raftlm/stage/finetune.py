"""Fine-tune: the configured objective on the Rank step's examples."""

from __future__ import annotations

from typing import Any

import numpy as np

from raftlm.core import token_pooled_nll
from raftlm.models.distributed import gather, shard, whole_model
from raftlm.stage.rank import Ranked
from raftlm.stage.rollouts import Rollouts
from raftlm.training.batches import Example, response_log_probs
from raftlm.training.trainer import PolicyTrainer


def fine_tune(trainer: PolicyTrainer, rollouts: Rollouts, ranked: Ranked, stage: int,
              pad_id: int, temperature: float) -> dict[str, Any]:
    """The configured objective on the Rank step's examples (at the stage's sampling
    `temperature`; from the initial policy with `training.start: restart`); `train/sft_loss`
    is the kept set's SFT loss before the update (raft_alignment's loss), under the policy
    that sampled them."""
    sft_loss = selected_sft_loss(trainer, rollouts, ranked.selection.mask, pad_id, temperature)
    trainer.set_sampling_temperature(temperature)
    if trainer.initial_weights is not None:
        trainer.restart(len(ranked.examples))
    return {"train/sft_loss": sft_loss, **trainer.train(ranked.examples, stage)}


def selected_sft_loss(trainer: PolicyTrainer, rollouts: Rollouts, mask: np.ndarray,
                      pad_id: int, temperature: float = 1.0) -> float | None:
    """Token-pooled NLL of the selected responses' own tokens under the current policy (at
    temperature 1, the SFT loss): from the log-probs recorded while sampling them when they
    were sampled at T = 1 (the sampler records log softmax(z / T)), else from a forward pass."""
    kept = [(rollouts.prompts[p], rollouts.responses[p][j]) for p, j in zip(*np.nonzero(mask))]
    if not kept:
        return None
    if temperature == 1 and all(r.token_log_probs is not None and r.loss_mask is None
                                for _, r in kept):
        return token_pooled_nll([np.asarray(r.token_log_probs) for _, r in kept])
    examples = [Example(p.token_ids, r.token_ids) for p, r in kept]
    with whole_model(trainer.accelerator, trainer.model) as policy:
        log_probs = response_log_probs(policy, shard(examples), pad_id,
                                       trainer.config.micro_batch_size, trainer.accelerator.device)
    log_probs = gather(log_probs)
    return token_pooled_nll([lp if r.loss_mask is None else lp[np.asarray(r.loss_mask, bool)]
                             for lp, (_, r) in zip(log_probs, kept)])
