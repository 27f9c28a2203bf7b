"""Prompts from HF `datasets`, offline: save_to_disk folders and the local HF cache by name."""

from __future__ import annotations

import json
import os

import pytest
from tiny import tiny_tokenizer

from raftlm.config import ConfigError, RaftConfig
from raftlm.data.hf_datasets import DatasetError
from raftlm.data.prompts import DataError, load_prompt_sets

datasets = pytest.importorskip("datasets")

TRAIN = {"prompt": ["What is 1 + 2?", "What is 2 + 2?", "What is 3 + 4?"],
         "answer": ["3", "4", "7"]}
TEST = {"prompt": ["What is 5 + 5?"], "answer": ["10"]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def config(**data) -> RaftConfig:
    return RaftConfig.from_dict({"data": data})


@pytest.fixture
def dataset_dict_dir(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(TRAIN),
                                   "test": datasets.Dataset.from_dict(TEST)})
    splits.save_to_disk(tmp_path / "arith")
    return tmp_path / "arith"


def test_a_saved_dataset_dict_gives_train_and_held_out_splits(dataset_dict_dir, tok):
    train, held_out = load_prompt_sets(
        config(dataset=str(dataset_dict_dir), split="train", eval_split="test"), tok)
    assert [r.prompt for r in train.records] == TRAIN["prompt"]
    assert [r.prompt for r in held_out.records] == TEST["prompt"]


def test_extra_columns_ride_along_as_with_files(dataset_dict_dir, tok):
    train, _ = load_prompt_sets(config(dataset=str(dataset_dict_dir)), tok)
    assert train.records[2].columns == {"answer": "7"}
    assert train.records[0].text.startswith("<|im_start|>user\nWhat is 1 + 2?")


def test_a_saved_single_dataset_is_the_training_split(tmp_path, tok):
    datasets.Dataset.from_dict(TRAIN).save_to_disk(tmp_path / "one")
    train, held_out = load_prompt_sets(config(dataset=str(tmp_path / "one")), tok)
    assert len(train) == 3 and held_out is None


def test_chat_message_prompts_load_from_a_dataset(tmp_path, tok):
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    datasets.Dataset.from_dict({"prompt": messages}).save_to_disk(tmp_path / "chat")
    train, _ = load_prompt_sets(config(dataset=str(tmp_path / "chat")), tok)
    assert train.records[0].prompt == messages[0]


def test_a_missing_split_is_named_with_the_available_ones(dataset_dict_dir, tok):
    with pytest.raises(DatasetError, match=r"data.eval_split: .* no split 'validation' "
                                           r"\(splits: train, test\)"):
        load_prompt_sets(config(dataset=str(dataset_dict_dir), eval_split="validation"), tok)


def test_a_missing_prompt_column_is_named_with_the_available_ones(dataset_dict_dir, tok):
    with pytest.raises(DataError, match=r"missing field 'question' \(columns: prompt, answer\)"):
        load_prompt_sets(config(dataset=str(dataset_dict_dir), prompt_field="question"), tok)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A dataset named `tiny_arith` in a temporary HF datasets cache, laid out as a Hub
    download leaves it (<name>/<config>/<version>/<hash>), built from a local JSONL file."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, columns in {"train": TRAIN, "test": TEST}.items():
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        files[split] = [str(tmp_path / f"{split}.jsonl")]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "hf_datasets_cache"
    builder = Json(cache_dir=str(cache), dataset_name="tiny_arith", hash="0123abcd",
                   data_files=DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    (built,) = (cache / "tiny_arith").glob("default-*")
    os.rename(built, cache / "tiny_arith" / "default")  # the Hub's configuration name
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_a_dataset_in_the_local_cache_loads_by_name_offline(hf_cache, tok):
    train, held_out = load_prompt_sets(
        config(dataset="tiny_arith", eval_split="test", dataset_config="default"), tok)
    assert [r.prompt for r in train.records] == TRAIN["prompt"]
    assert [r.columns["answer"] for r in held_out.records] == ["10"]


def test_an_unknown_split_of_a_cached_dataset_is_named(hf_cache, tok):
    with pytest.raises(DatasetError, match=r"data.split: tiny_arith: .*validation"):
        load_prompt_sets(config(dataset="tiny_arith", split="validation"), tok)


def test_a_dataset_neither_on_disk_nor_cached_is_refused_without_downloading(hf_cache, tok):
    with pytest.raises(DatasetError, match="neither a dataset folder nor in the local HF"):
        load_prompt_sets(config(dataset="someone/not_here"), tok)


def test_config_refuses_both_a_train_file_and_a_dataset():
    with pytest.raises(ConfigError, match="`train_file` or `dataset`, not both"):
        config(train_file="a.jsonl", dataset="arith")


def test_config_refuses_an_eval_split_without_a_dataset():
    with pytest.raises(ConfigError, match="data.eval_split: needs data.dataset"):
        config(train_file="a.jsonl", eval_split="test")
