"""Prompts from Hugging Face `datasets`, offline: a folder written by ``save_to_disk``, or a
dataset already in the local HF cache, by name. Nothing is ever downloaded.

``datasets`` is an optional dependency (``pip install 'raftlm[datasets]'``), imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raftlm.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset, split or configuration is unusable; the message names it and what exists."""


def load_dataset_rows(name: str, split: str, dataset_config: str | None,
                      split_field: str = "data.split") -> tuple[list[dict], str]:
    """The rows of one split of a dataset, and a name for it in messages (``name[split]``).

    ``name`` is a ``save_to_disk`` folder (a ``DatasetDict``'s split, or a single ``Dataset``,
    which is the training split itself), any other local dataset folder, or a dataset name in
    the local HF cache (``dataset_config`` picks its configuration).
    """
    datasets = _import_datasets()
    path = Path(name).expanduser()
    if (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
        if split not in splits:
            raise DatasetError(f"{split_field}: {path} has no split '{split}' "
                               f"(splits: {', '.join(splits)})")
        dataset = splits[split]
    elif (path / "state.json").is_file():
        if split_field != "data.split":
            raise DatasetError(f"{split_field}: {path} holds a single Dataset, not a DatasetDict "
                               "with splits; use data.eval_file for held-out prompts")
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = _load_offline(datasets, name, split, dataset_config, split_field)
    return dataset.to_list(), f"{name}[{split}]"


def _load_offline(datasets: Any, name: str, split: str, dataset_config: str | None,
                  split_field: str) -> Any:
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # only what is on this machine: never the Hub
    try:
        return datasets.load_dataset(name, dataset_config, split=split,
                                     download_mode="reuse_dataset_if_exists")
    except ValueError as err:
        if "split" in str(err).lower():
            raise DatasetError(f"{split_field}: {name}: {err}") from None
        raise DatasetError(f"data.dataset_config: {name}: {err}") from None
    except (ConnectionError, FileNotFoundError) as err:
        raise DatasetError(
            f"data.dataset: '{name}' is neither a dataset folder nor in the local HF datasets "
            f"cache ({datasets.config.HF_DATASETS_CACHE}); raftlm downloads nothing ({err})"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            "data.dataset needs the `datasets` package: pip install 'raftlm[datasets]'"
        ) from None
    return datasets
