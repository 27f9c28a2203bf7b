"""Anchor data (`data.anchor`): a fixed SFT set mixed into every stage's training examples, as
DeepSeek-R1 mixed general SFT rows into its RL data and RFT trains with the original SFT set.

Rows are read like prompt files (.jsonl, .json, .csv, .parquet) or a `datasets` folder; the
prompt column is rendered exactly as the training prompts are (chat template, system prompt,
`data.max_prompt_tokens`), the response column is tokenized once at load and ends with the eos
token, as a sampled response that stopped does. Which rows a stage takes depends on (run seed,
stage) alone, so a resumed run mixes in the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raftlm.config import RaftConfig
from raftlm.data.hf_datasets import load_dataset_rows
from raftlm.data.prompts import DataError, PromptRecord, build_prompt_set, read_rows

ANCHOR_STREAM = 2  # the anchor draw's seed stream: (run seed, stage, ANCHOR_STREAM)


@dataclass
class AnchorRow:
    prompt: PromptRecord  # as the training prompts are rendered; id = row number in the source
    response_ids: list[int]  # the response column's tokens, then eos


def load_anchor(config: RaftConfig, tokenizer: Any) -> list[AnchorRow] | None:
    """The rows of `data.anchor` (None when it is not set), prompts rendered and responses
    tokenized; prompts over `data.max_prompt_tokens` are skipped, as training prompts are."""
    anchor = config.data.anchor
    if anchor is None:
        return None
    path = Path(anchor.path).expanduser()
    if path.is_file():
        rows, source = read_rows(path), str(path)
    else:  # a save_to_disk folder (or a dataset in the local HF cache)
        rows, source = load_dataset_rows(anchor.path, anchor.split, None, "data.anchor.split")
    prompts = build_prompt_set(
        rows, tokenizer, prompt_field=anchor.prompt_field,
        max_prompt_tokens=config.data.max_prompt_tokens, system_prompt=config.data.system_prompt,
        source=f"data.anchor {source}")
    if tokenizer.eos_token_id is None:
        raise DataError("data.anchor: the tokenizer has no eos token to end the responses with")
    out = []
    for record in prompts.records:
        response = record.columns.get(anchor.response_field)
        if not isinstance(response, str) or not response:
            raise DataError(f"data.anchor {source}: row {record.id + 1}: field "
                            f"'{anchor.response_field}' must be non-empty text, got "
                            f"{response!r:.80}")
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        out.append(AnchorRow(record, list(ids) + [tokenizer.eos_token_id]))
    return out


def anchor_draw(n_rows: int, n: int, seed: int, stage: int) -> list[int]:
    """Which `n` of `n_rows` anchor rows stage `stage` trains on (all of them when n >= n_rows):
    drawn without replacement, seeded by (run seed, stage) alone."""
    rng = np.random.default_rng([seed, stage, ANCHOR_STREAM])
    return rng.permutation(n_rows)[: min(n, n_rows)].tolist()
