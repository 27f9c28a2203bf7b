"""Prompt files, prompt sets, the per-stage prompt sampler, and built-in tasks."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_tokenizer

from raftlm.config import DataConfig
from raftlm.data.prompts import (
    DataError,
    PromptOrder,
    build_prompt_set,
    load_prompt_set,
    read_rows,
)
from raftlm.data.tasks import arithmetic_rows, builtin_task_rows

ROWS = [{"prompt": "What is 1 + 2?", "answer": "3"}, {"prompt": "What is 2 + 2?", "answer": "4"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(rows, tokenizer, **overrides):
    kwargs = dict(prompt_field="prompt", max_prompt_tokens=512, system_prompt=None, source="t")
    kwargs.update(overrides)
    return build_prompt_set(rows, tokenizer, **kwargs)


# --- reading files ---------------------------------------------------------------------------


def test_reads_jsonl_skipping_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert read_rows(path) == ROWS


def test_reads_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS))
    assert read_rows(path) == ROWS


def test_reads_csv_as_text(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,answer\n"What is 1 + 2?",3\n"What is 2 + 2?",4\n')
    assert read_rows(path) == ROWS


def test_reads_parquet_with_chat_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "3"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert read_rows(tmp_path / "p.parquet") == rows


def test_malformed_jsonl_line_reports_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"p\.jsonl:3: invalid JSON"):
        read_rows(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_rows(path)


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hi")
    with pytest.raises(DataError, match=r"supported: \.jsonl, \.json, \.csv, \.parquet"):
        read_rows(path)


def test_missing_prompt_field_reports_line_and_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"question": "x", "answer": "1"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'prompt' \(columns: question"):
        load_prompt_set(path, tok, DataConfig())


def test_malformed_chat_messages_report_location(tok):
    with pytest.raises(DataError, match=r"row 1: field 'prompt' message 0"):
        build([{"prompt": [{"role": "user"}]}], tok)


# --- building prompt sets --------------------------------------------------------------------


def test_chat_template_is_applied_to_text_prompts(tok):
    record = build(ROWS, tok).records[0]
    assert record.text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert record.token_ids == tok(record.text, add_special_tokens=False)["input_ids"]
    assert record.prompt == "What is 1 + 2?"


def test_plain_text_is_used_without_a_chat_template(plain_tok):
    record = build(ROWS, plain_tok).records[0]
    assert record.text == "What is 1 + 2?"


def test_chat_messages_are_rendered_with_the_template(tok):
    messages = [{"role": "user", "content": "hi"}]
    record = build([{"prompt": messages}], tok).records[0]
    assert record.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert record.prompt == messages


def test_system_prompt_is_prepended(tok):
    record = build(ROWS, tok, system_prompt="Be brief.").records[0]
    assert record.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_system_prompt_does_not_replace_an_existing_one(tok):
    messages = [{"role": "system", "content": "Own."}, {"role": "user", "content": "hi"}]
    record = build([{"prompt": messages}], tok, system_prompt="Be brief.").records[0]
    assert "Be brief." not in record.text and "Own." in record.text


def test_other_columns_pass_through(tok):
    rows = [{"prompt": "q", "answer": "3", "meta": {"level": 2}}]
    assert build(rows, tok).records[0].columns == {"answer": "3", "meta": {"level": 2}}


def test_too_long_prompts_are_skipped_and_counted_not_truncated(tok):
    rows = [{"prompt": "short"}, {"prompt": "x" * 100}, {"prompt": "tiny"}]
    prompt_set = build(rows, tok, max_prompt_tokens=40)
    assert [r.id for r in prompt_set.records] == [0, 2]
    assert prompt_set.n_skipped_too_long == 1


def test_all_prompts_too_long_is_an_error(tok):
    with pytest.raises(DataError, match="all 2 prompts are longer"):
        build(ROWS, tok, max_prompt_tokens=5)


def test_load_prompt_set_uses_the_data_config(tmp_path, tok):
    rows = [{"question": "What?", "answer": "1"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    config = DataConfig(prompt_field="question", system_prompt="S")
    prompt_set = load_prompt_set(path, tok, config)
    assert prompt_set.records[0].prompt == "What?" and "S" in prompt_set.records[0].text
    assert prompt_set.source == str(path)


# --- sampler ---------------------------------------------------------------------------------


def test_sampler_does_not_repeat_until_the_set_is_exhausted():
    sampler = PromptOrder(10, seed=0)
    drawn = sampler.draw(4) + sampler.draw(4) + sampler.draw(2)
    assert sorted(drawn) == list(range(10))


def test_sampler_reshuffles_for_each_pass():
    sampler = PromptOrder(20, seed=0)
    assert sampler.draw(20) != sampler.draw(20)


def test_sampler_draw_crossing_a_pass_has_no_repeats():
    for seed in range(20):
        sampler = PromptOrder(5, seed=seed)
        for _ in range(10):
            stage = sampler.draw(3)
            assert len(set(stage)) == 3


def test_sampler_is_deterministic_under_its_seed():
    a, b, c = PromptOrder(50, seed=1), PromptOrder(50, seed=1), PromptOrder(50, seed=2)
    assert [a.draw(7) for _ in range(9)] == [b.draw(7) for _ in range(9)]
    assert PromptOrder(50, seed=1).draw(7) != c.draw(7)


def test_sampler_state_round_trip_continues_the_same_sequence():
    uninterrupted = PromptOrder(7, seed=3)
    expected = [uninterrupted.draw(3) for _ in range(6)]
    first = PromptOrder(7, seed=3)
    got = [first.draw(3) for _ in range(3)]  # 9 draws: just crossed into the second pass
    resumed = PromptOrder(7, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.draw(3) for _ in range(3)]
    assert got == expected


# --- built-in tasks --------------------------------------------------------------------------


def test_arithmetic_splits_are_disjoint():
    train = {r["prompt"] for r in arithmetic_rows("train", 7100)}
    evaluation = {r["prompt"] for r in arithmetic_rows("eval", 1000)}
    assert len(train) == 7100 and len(evaluation) == 1000 and not train & evaluation


def test_arithmetic_rows_are_deterministic_and_prefixes_of_each_other():
    assert arithmetic_rows("train", 50, seed=4) == arithmetic_rows("train", 100, seed=4)[:50]
    assert arithmetic_rows("eval", 5, seed=4) != arithmetic_rows("eval", 5, seed=5)


def test_arithmetic_answers_are_the_sums():
    for row in arithmetic_rows("eval", 100):
        a, b = row["prompt"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert row["answer"] == str(int(a) + int(b))


def test_arithmetic_rejects_more_rows_than_the_split_holds():
    with pytest.raises(ValueError, match="eval split has 1000 prompts"):
        arithmetic_rows("eval", 1001)


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match="known tasks: arithmetic"):
        builtin_task_rows("poetry", "train", 1, 0)
