"""GSM8K shipped inside the package: the files unchanged, the license beside them, the package
data declared, and the task usable for training and evaluation."""

import hashlib
import json
import zlib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from raftlm.config import RaftConfig
from raftlm.data.gsm8k import (
    GSM8K_INSTRUCTION,
    GSM8K_TEST_SIZE,
    gsm8k_file,
    gsm8k_originals,
    gsm8k_rows,
)
from raftlm.data.prompts import load_prompt_sets
from raftlm.data.tasks import TASKS, builtin_task_rows, eval_split_size, with_shots
from raftlm.errors import UserError
from raftlm.rewards.verifiable import numeric_answer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src/raftlm/data/gsm8k"
SHARED = ROOT.parent / "shared/data/gsm8k"  # where the files came from, where present
SHA256 = {"eval": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
          "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"}


@pytest.mark.parametrize("split, rows", [("train", 7473), ("eval", 1319)])
def test_the_shipped_files_are_the_originals_byte_for_byte(split, rows):
    data = gsm8k_file(split).read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256[split]
    assert len(gsm8k_originals(split)) == rows == data.count(b"\n")
    if SHARED.is_dir():
        assert data == (SHARED / Path(str(gsm8k_file(split))).name).read_bytes()


def test_the_test_split_size_is_the_files():
    assert eval_split_size("gsm8k") == GSM8K_TEST_SIZE == len(gsm8k_originals("eval"))
    assert eval_split_size("arithmetic") == 1000


def test_the_rows_read_are_the_files_rows_unchanged():
    line = gsm8k_file("eval").read_text(encoding="utf-8").splitlines()[0]
    assert gsm8k_originals("eval")[0] == json.loads(line)


def test_the_mit_license_ships_beside_the_data():
    license_text = (SHIPPED / "LICENSE").read_text()
    assert "MIT License" in license_text and "Copyright (c) 2021 OpenAI" in license_text


def test_package_data_declares_every_shipped_file_and_stays_small():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["raftlm"]
    shipped = [p for p in SHIPPED.iterdir() if p.is_file()]
    for path in shipped:
        relative = str(path.relative_to(ROOT / "src/raftlm"))
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative
    # What a wheel carries: ~1.6 MB compressed (4.9 MB raw), far below PyPI's 100 MB per file.
    compressed = sum(len(zlib.compress(p.read_bytes(), 6)) for p in shipped)
    assert compressed < 3_000_000


def test_a_row_has_the_question_with_the_format_and_the_number_as_answer():
    row = gsm8k_rows("eval", 1)[0]
    assert row["prompt"].startswith("Janet\u2019s ducks lay 16 eggs")
    assert row["prompt"].endswith(GSM8K_INSTRUCTION)
    assert row["answer"] == "18"
    assert "<<" not in row["solution"] and row["solution"].endswith("#### 18")


def test_answers_with_thousands_commas_become_plain_numbers():
    answers = [r["answer"] for r in gsm8k_rows("train", 7473)]
    assert all("," not in a for a in answers)
    assert any(len(a) > 3 for a in answers)


def test_gsm8k_is_a_built_in_task_and_refuses_more_rows_than_it_has():
    assert TASKS["gsm8k"] is gsm8k_rows
    with pytest.raises(UserError, match="gsm8k eval split has 1319 prompts; asked for 2000"):
        builtin_task_rows("gsm8k", "eval", 2000, 0)


def test_data_task_gsm8k_trains_on_train_and_holds_out_test_with_the_numeric_reward(tok):
    config = RaftConfig.from_dict({"data": {"task": "gsm8k", "task_train_size": 5,
                                            "task_eval_size": 3, "max_prompt_tokens": 4096}})
    train, held_out = load_prompt_sets(config, tok)
    assert [r.prompt for r in train.records] == [r["prompt"] for r in gsm8k_rows("train", 5)]
    assert [r.prompt for r in held_out.records] == [r["prompt"] for r in gsm8k_rows("eval", 3)]
    answers = [r.columns["answer"] for r in held_out.records]
    completions = ["She makes $18 a day.\n#### 18", "#### 3", "#### 70000"]
    assert numeric_answer([], completions, answer=answers) == [1.0, 1.0, 1.0]


def test_k_shot_prompts_are_earlier_turns_from_the_train_split():
    rows = with_shots("gsm8k", gsm8k_rows("eval", 2), shots=2, seed=0)
    train = gsm8k_rows("train", 2)
    turns = rows[0]["prompt"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[0]["content"] == train[0]["prompt"]
    assert turns[1]["content"] == train[0]["solution"]
    assert turns[-1]["content"] == gsm8k_rows("eval", 1)[0]["prompt"]
    assert rows[1]["answer"] == gsm8k_rows("eval", 2)[1]["answer"]
    assert with_shots("gsm8k", rows, 0, 0) is rows
