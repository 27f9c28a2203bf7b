"""Examples as tensors, and the per-token log-likelihood every objective and metric starts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from raftlm.models.loading import attention_kinds, cache_keyword, forward_cache

IGNORE = -100


@dataclass
class Example:
    """One (prompt, response) pair to train on, as token ids."""

    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class TrainingExample(Example):
    """An example as the Rank step hands it to training: its weight (reward weight or
    advantage), the sampling policy's log-probs of its response tokens when the sampler
    recorded them (pi_old), and which response tokens are the model's (`loss_mask`, 1 per
    token trained on; None: all of them)."""

    weight: float = 1.0
    old_log_probs: list[float] | None = None
    loss_mask: list[int] | None = None
    # per response token: pi_old / pi_sampler as `training.rollout_correction` weighs it
    correction: list[float] | None = None


@dataclass
class PairExample(Example):
    """A preference pair for the paired losses (dpo, rpo): one prompt, its chosen response
    (`response_ids`, `loss_mask`) and a rejected one, and the reference policy's summed
    log-probs of each (over their `loss_mask` tokens), set by training before the stage's first
    update."""

    rejected_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] | None = None
    rejected_loss_mask: list[int] | None = None
    ref_chosen: float | None = None
    ref_rejected: float | None = None


def sequences(examples: list[Example]) -> list[Example]:
    """The (prompt, response) rows a micro-batch of examples stands for: each example itself,
    a pair its chosen response then its rejected one (rows 2i and 2i + 1)."""
    rows: list[Example] = []
    for example in examples:
        if isinstance(example, PairExample):
            rows += [TrainingExample(example.prompt_ids, example.response_ids,
                                     loss_mask=example.loss_mask),
                     TrainingExample(example.prompt_ids, example.rejected_ids,
                                     loss_mask=example.rejected_loss_mask)]
        else:
            rows.append(example)
    return rows


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels with prompt and padding masked, and
    the response tokens a `loss_mask` marks 0 (not the model's: they get no loss, for every
    objective, and count in no token total)."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(example.prompt_ids) : len(ids)] = torch.tensor(example.response_ids)
        loss_mask = getattr(example, "loss_mask", None)  # a plain Example trains every token
        if loss_mask is not None:
            masked = torch.tensor(loss_mask, dtype=torch.bool).logical_not()
            labels[row, len(example.prompt_ids) : len(ids)][masked] = IGNORE
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_nll(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0
              ) -> torch.Tensor:
    """Negative log-likelihood of every position's next token; 0 where the label is masked.

    With `temperature` T the distribution is softmax(logits / T), the one a sampler at T draws
    from (the ratio objectives train and compare at the sampling temperature).

    Logits are computed only where a label is kept (response tokens), in chunks of at most
    `LOGITS_PER_CHUNK` values, each recomputed in backward rather than stored: peak memory does
    not grow with the vocabulary, and prompt and padding positions never reach the LM head.
    The model (a DDP wrapper included) is still called as a whole, for its last hidden states;
    models whose head does more than a plain projection, or whose head weight is sharded
    (FSDP, DeepSpeed ZeRO-3), take the full-logits path.
    """
    targets = batch["labels"][:, 1:]
    head = _plain_output_head(model)
    if head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(_tempered(logits[:, :-1].float(), temperature).transpose(1, 2),
                               targets, ignore_index=IGNORE, reduction="none")  # [B, L-1]
    keep = targets != IGNORE
    shared = _shared_prefix_length(model, batch)
    hidden = _last_hidden_states(model, batch, shared)[:, :-1][keep[:, shared:]]  # [N, hidden]
    kept_targets = targets[keep]
    per_chunk = max(1, LOGITS_PER_CHUNK // head.out_features)
    pieces = []
    for start in range(0, hidden.shape[0], per_chunk):
        args = (head, hidden[start : start + per_chunk], kept_targets[start : start + per_chunk],
                temperature)
        if torch.is_grad_enabled() and hidden.shape[0] > per_chunk:
            pieces.append(checkpoint(_head_nll, *args, use_reentrant=False))
        else:
            pieces.append(_head_nll(*args))
    values = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(
        keep, values)


LOGITS_PER_CHUNK = 2**24  # fp32 logits of one chunk: 64 MB


def _last_hidden_states(model: Any, batch: dict[str, torch.Tensor], shared: int) -> torch.Tensor:
    """The last layer's hidden states at positions `shared`.. of every row.

    The first `shared` tokens, the same in every row (a system prompt, a repeated prompt), are
    run once and their keys and values broadcast to all rows: the same loss and gradients
    (backward sums the rows' contributions through the broadcast) without computing that prefix
    once per row. The prefix runs on the unwrapped model; the rows' forward goes through the
    wrapper, the one call a DDP step prepares its gradient reduction for.
    """
    no_logits = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    cache = None
    if shared:
        inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
        cache = forward_cache(inner(input_ids=batch["input_ids"][:1, :shared], use_cache=True,
                                    logits_to_keep=no_logits))
        rows = batch["input_ids"].shape[0]
        for layer in cache.layers:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
    out = model(input_ids=batch["input_ids"][:, shared:], attention_mask=batch["attention_mask"],
                **{cache_keyword(model): cache}, use_cache=cache is not None,
                output_hidden_states=True, logits_to_keep=no_logits)
    return out.hidden_states[-1]


def _shared_prefix_length(model: Any, batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens all rows share, up to the first position whose hidden state is
    needed (that of the token before the first label); 0 where sharing does not apply."""
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2 or not _can_share_prefix(model):
        return 0
    same = (ids == ids[:1]).all(dim=0).long().cumprod(dim=0)  # 1 while every row agrees
    labelled = labels != IGNORE
    first_label = int(torch.where(labelled.any(dim=1), labelled.long().argmax(dim=1),
                                  labels.shape[1]).min())
    shared = min(int(same.sum()), first_label - 1)
    return shared if shared >= MIN_SHARED_PREFIX else 0


# Below this many shared tokens a second forward costs more than it saves.
MIN_SHARED_PREFIX = 8


def _can_share_prefix(model: Any) -> bool:
    """Full-attention decoders with a cache (gradient checkpointing turns the cache off)."""
    inner = getattr(model, "module", model)
    if getattr(inner, "config", None) is None:
        return False
    # transformers renamed the flag (is_gradient_checkpointing warns from 5.24 on).
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    return not checkpointing and attention_kinds(inner) <= {"full_attention"}


def _head_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    # The head runs in its weights' precision, not autocast's: bf16 logits near 20 are rounded
    # to steps of 0.125, which blurs the loss and its gradient once the model is confident.
    with torch.autocast(hidden.device.type, enabled=False):
        logits = head(hidden.to(head.weight.dtype))
    return F.cross_entropy(_tempered(logits.float(), temperature), targets, reduction="none")


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # T = 1 leaves the tensor untouched: training at T = 1 stays bit-identical.
    return logits if temperature == 1.0 else logits / temperature


def _plain_output_head(model: Any) -> torch.nn.Linear | None:
    """The LM head when logits are exactly `head(last hidden state)` and its weight is whole."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if type(inner).__name__ == "FullyShardedDataParallel":
        return None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    config = getattr(inner, "config", None)
    if config is None or not isinstance(head, torch.nn.Linear):
        return None
    if any(getattr(config, name, None) for name in _LOGIT_TRANSFORMS):
        return None
    weight = head.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or hasattr(weight, "ds_id"):
        return None  # a DTensor (FSDP2) or a ZeRO-3 partition: only whole inside forward
    return head


# Config fields of models whose logits are more than the head's projection.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier_scale")


@torch.inference_mode()
def response_log_probs(
    model: Any, examples: list[Example], pad_id: int, batch_size: int, device: torch.device,
    temperature: float = 1.0,
) -> list[np.ndarray]:
    """Per-token log-probabilities of each example's response under `model` (eval mode), from
    softmax(logits / temperature)."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        nll = token_nll(model, batch, temperature).cpu().numpy()
        mask = (batch["labels"][:, 1:] != IGNORE).cpu().numpy()
        out += [-row[m] for row, m in zip(nll, mask)]
    model.train(was_training)
    return out
