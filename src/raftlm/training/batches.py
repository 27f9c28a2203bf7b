"""Examples as tensors, and the per-token log-likelihood every objective and metric starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class Example:
    """One (prompt, response) pair to imitate, as token ids."""

    prompt_ids: list[int]
    response_ids: list[int]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels with prompt and padding masked."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(example.prompt_ids) : len(ids)] = torch.tensor(example.response_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood of every position's next token; 0 where the label is masked."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
    )
    return nll  # [B, L-1]


@torch.inference_mode()
def response_log_probs(
    model: Any, examples: list[Example], pad_id: int, batch_size: int, device: torch.device
) -> list[np.ndarray]:
    """Per-token log-probabilities of each example's response under `model`."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        nll = token_nll(model, batch).cpu().numpy()
        mask = (batch["labels"][:, 1:] != IGNORE).cpu().numpy()
        out += [-row[m] for row, m in zip(nll, mask)]
    model.train(was_training)
    return out
