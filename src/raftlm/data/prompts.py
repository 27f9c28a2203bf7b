"""Prompt sets: read prompt files, apply the chat template, tokenize, and draw prompts per stage.

A prompt file is .jsonl, .json (a list of objects), .csv or .parquet. One column holds the
prompt (text, or chat messages ``[{role, content}, ...]``); every other column (a reference
``answer``, say) rides along to the reward functions.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raftlm.config import DataConfig, RaftConfig
from raftlm.data.hf_datasets import load_dataset_rows
from raftlm.data.tasks import builtin_task_rows
from raftlm.errors import UserError

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


class DataError(UserError, ValueError):
    """A prompt file or row is unusable; the message says file, line or row, and field."""


@dataclass
class PromptRecord:
    id: int  # row number in the source (0-based): stable, so seeds and resume can rely on it
    prompt: str | list[dict]  # the original prompt value, as reward functions expect it
    text: str  # what the model sees (chat template applied when the tokenizer has one)
    token_ids: list[int]
    columns: dict[str, Any]  # every other column of the row


@dataclass
class PromptSet:
    records: list[PromptRecord]
    n_skipped_too_long: int
    source: str

    def __len__(self) -> int:
        return len(self.records)


def read_rows(path: str | Path) -> list[dict]:
    """Read every row of a prompt file as a dict (blank JSONL lines are skipped)."""
    return _read_rows_located(Path(path))[0]


def load_prompt_set(path: str | Path, tokenizer: Any, config: DataConfig) -> PromptSet:
    """Read a prompt file and build its PromptSet with the data config's field, limits, system."""
    rows, locations = _read_rows_located(Path(path))
    return build_prompt_set(
        rows,
        tokenizer,
        prompt_field=config.prompt_field,
        max_prompt_tokens=config.max_prompt_tokens,
        system_prompt=config.system_prompt,
        source=str(path),
        locations=locations,
    )


def dataset_prompt_set(config: DataConfig, split: str, tokenizer: Any,
                       split_field: str = "data.split") -> PromptSet:
    """One split of ``data.dataset`` (a save_to_disk folder or the local HF cache) as a
    PromptSet, with the same prompt field and extra-column rules as prompt files."""
    rows, source = load_dataset_rows(config.dataset, split, config.dataset_config, split_field)
    return build_prompt_set(
        rows, tokenizer, prompt_field=config.prompt_field,
        max_prompt_tokens=config.max_prompt_tokens, system_prompt=config.system_prompt,
        source=source,
    )


def build_prompt_set(
    rows: list[dict],
    tokenizer: Any,
    *,
    prompt_field: str,
    max_prompt_tokens: int,
    system_prompt: str | None,
    source: str,
    locations: list[str] | None = None,
) -> PromptSet:
    """Render and tokenize each row's prompt; skip (and count) prompts over max_prompt_tokens.

    ``locations`` names each row in error messages (``file:line``); default ``source row i``.
    """
    if not rows:
        raise DataError(f"{source}: no rows")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    records, n_skipped = [], 0
    for i, row in enumerate(rows):
        where = locations[i] if locations else f"{source}: row {i + 1}"
        if prompt_field not in row:
            raise DataError(
                f"{where}: missing field '{prompt_field}' (columns: {', '.join(map(str, row))})"
            )
        prompt = _check_prompt(row[prompt_field], where, prompt_field)
        text, token_ids = _render(prompt, tokenizer, has_template, system_prompt, where)
        if len(token_ids) > max_prompt_tokens:
            n_skipped += 1  # never truncate: a cut prompt asks a different question
            continue
        columns = {k: v for k, v in row.items() if k != prompt_field}
        records.append(PromptRecord(i, prompt, text, token_ids, columns))
    if not records:
        raise DataError(
            f"{source}: all {len(rows)} prompts are longer than max_prompt_tokens="
            f"{max_prompt_tokens}"
        )
    return PromptSet(records, n_skipped, source)


def render_chat(prompt: str | list[dict], tokenizer: Any, system_prompt: str | None = None,
                ) -> tuple[str, list[int]]:
    """The text and token ids the model sees for a prompt (text or chat messages), with the
    same chat template and system prompt as training; `raftlm sample` and `raftlm chat` use it."""
    prompt = _check_prompt(prompt, "prompt", "prompt")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return _render(prompt, tokenizer, has_template, system_prompt, "prompt")


def _check_prompt(value: Any, where: str, field: str) -> str | list[dict]:
    if isinstance(value, np.ndarray):  # parquet readers may hand lists back as arrays
        value = value.tolist()
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        for j, message in enumerate(value):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{where}: field '{field}' message {j} must be a {{role, content}} dict "
                    f"with text values, got {message!r:.80}"
                )
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(
        f"{where}: field '{field}' must be text or a non-empty list of {{role, content}} "
        f"messages, got {type(value).__name__}: {value!r:.80}"
    )


def _render(
    prompt: str | list[dict],
    tokenizer: Any,
    has_template: bool,
    system_prompt: str | None,
    where: str,
) -> tuple[str, list[int]]:
    """The text the model sees and its token ids."""
    if has_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds the special tokens it wants; don't add a second BOS.
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: chat messages need a tokenizer with a chat template")
    text = prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
    return text, tokenizer(text)["input_ids"]


def _read_rows_located(path: Path) -> tuple[list[dict], list[str]]:
    """Rows plus a location string for each (``file:line`` or ``file: row n``)."""
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}'; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    reader = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }[path.suffix.lower()]
    rows, locations = reader(path)
    if not rows:
        raise DataError(f"{path}: file has no rows")
    return rows, locations


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, locations = [], []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON: {err}") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
            locations.append(f"{path}:{line_no}")
    return rows, locations


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1}: expected an object, got {type(row).__name__}")
    return data, [f"{path}: row {i + 1}" for i in range(len(data))]


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    # The csv module keeps every cell as text, so answers like "007" survive unchanged.
    with path.open(encoding="utf-8", newline="") as f:
        rows = [dict(row) for row in csv.DictReader(f)]
    return rows, [f"{path}: row {i + 1}" for i in range(len(rows))]


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq  # optional dependency, only for parquet files

    rows = pq.read_table(path).to_pylist()  # plain Python values: lists of dicts stay lists
    return rows, [f"{path}: row {i + 1}" for i in range(len(rows))]


class PromptOrder:
    """Draws prompt positions per stage: seeded, without replacement until the set is used up.

    Each pass over the set is a fresh permutation (seeded by ``(seed, pass)``). A draw that
    crosses the end of a pass takes the rest of the old permutation, then continues in the new
    one, whose items already taken in this draw are moved to its end, so one stage never sees
    a prompt twice when ``b <= n``.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"PromptOrder needs at least one prompt, got n={n}")
        self.n = n
        self.seed = seed
        self.epoch = 0  # passes started so far minus one
        self.position = 0  # next index into the current permutation
        self.deferred: list[int] = []  # items moved to the end of the current permutation
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        if self.deferred:
            late = set(self.deferred)
            order = [i for i in order if i not in late] + [i for i in order if i in late]
        return order

    def draw(self, b: int) -> list[int]:
        """The next b prompt positions."""
        if b < 0:
            raise ValueError(f"cannot draw {b} prompts")
        drawn: list[int] = []
        while len(drawn) < b:
            if self.position == self.n:
                self.epoch += 1
                self.position = 0
                self.deferred = list(dict.fromkeys(drawn))
                self._order = self._permutation()
            take = min(b - len(drawn), self.n - self.position)
            drawn += self._order[self.position : self.position + take]
            self.position += take
        return drawn

    def state_dict(self) -> dict:
        """JSON-serialisable state; ``load_state_dict`` of it continues the same sequence."""
        return {
            "n": self.n,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "deferred": list(self.deferred),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise DataError(
                f"prompt order state is for {state['n']} prompts but this prompt set has {self.n}"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.deferred = [int(i) for i in state["deferred"]]
        self._order = self._permutation()


def load_prompt_sets(config: RaftConfig, tokenizer: Any) -> tuple[PromptSet, PromptSet | None]:
    """The training prompts and the held-out prompts (None without an eval file) of a run."""
    data = config.data
    if data.task:
        def build(split: str, n: int) -> PromptSet:
            rows = builtin_task_rows(data.task, split, n, config.run.seed)
            return build_prompt_set(
                rows, tokenizer, prompt_field="prompt", max_prompt_tokens=data.max_prompt_tokens,
                system_prompt=data.system_prompt, source=f"builtin:{data.task}/{split}",
            )
        train_set = build("train", data.task_train_size)
        eval_set = build("eval", data.task_eval_size)
    else:
        train_set = (dataset_prompt_set(data, data.split, tokenizer) if data.dataset
                     else load_prompt_set(data.train_file, tokenizer, data))
        eval_set = load_prompt_set(data.eval_file, tokenizer, data) if data.eval_file else None
        if data.eval_split:
            eval_set = dataset_prompt_set(data, data.eval_split, tokenizer, "data.eval_split")
    if eval_set is not None and data.max_eval_prompts:
        eval_set.records = eval_set.records[: data.max_eval_prompts]
    return train_set, eval_set
