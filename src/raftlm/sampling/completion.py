"""What every sampling backend returns, and the helpers they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Completion:
    text: str  # decoded response (special tokens skipped), cut right after a stop string
    token_ids: list[int]  # generated ids, with the eos or the token that completed a stop string
    finish_reason: str  # "eos" | "stop_string" | "length"
    # log-prob of each generated token under the distribution it was sampled from:
    # log softmax(logits / T) at generation.temperature T (T = 1 for greedy decoding), before
    # top-k/top-p truncation, fp32; at T = 1 the policy's own log pi(token | prefix). None where
    # the backend did not record them (vllm). Objectives use them as pi_old, evaluation for its
    # KL estimate.
    token_log_probs: list[float] | None = None


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's eos plus the model's generation-config eos (an int or a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_config = getattr(model, "generation_config", None)
    extra = getattr(gen_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(e) for e in extra)
    return ids


def cut_at_stop(ids: list[int], eos_ids: set[int], stops: Sequence[str], tokenizer
         ) -> tuple[list[int], str]:
    """Trim HF's padded output after the first eos or the token completing a stop string."""
    end = next((t + 1 for t, token in enumerate(ids) if token in eos_ids), None)
    if end is not None:
        ids = ids[:end]
    if stops and stop_end(tokenizer.decode(ids, skip_special_tokens=True), stops) is not None:
        # The shortest prefix whose text holds a stop string (containment grows with length).
        low, high = 1, len(ids)
        while low < high:
            mid = (low + high) // 2
            text = tokenizer.decode(ids[:mid], skip_special_tokens=True)
            low, high = (low, mid) if stop_end(text, stops) is not None else (mid + 1, high)
        return ids[:low], "stop_string"
    return ids, ("eos" if end is not None else "length")


def stop_end(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text`` ends, or None."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


def to_completion(tokenizer, ids: list[int], reason: str, stops: Sequence[str],
                  log_probs: Sequence[float] | None = None) -> Completion:
    """The Completion of generated ``ids`` (and their log-probs, one per id, when recorded)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if reason == "stop_string":
        end = stop_end(text, stops)
        text = text if end is None else text[:end]
    if log_probs is not None:
        log_probs = [float(x) for x in log_probs[: len(ids)]]
    return Completion(text=text, token_ids=list(ids), finish_reason=reason,
                      token_log_probs=log_probs)
