"""`raftlm sample` and `raftlm chat` on a tiny model: rewards, multi-turn, streaming, a terminal."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import save_tiny_model

from raftlm import RaftConfig, train
from raftlm.cli import main as cli_main
from raftlm.tools import chat as chat_module
from raftlm.tools.chat import chat, sample_responses, stream_reply
from raftlm.tools.target import load_target

SRC = Path(__file__).resolve().parents[1] / "src"
REWARD_FILE = """
def matches(prompts, completions, answer, **columns):
    return [float(a in c) for a, c in zip(answer, completions)]
"""


def short(target, max_new_tokens: int = 8):
    """The target's sampling settings with short responses (tests stay fast)."""
    return dataclasses.replace(target.config.generation, max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dir):
    """One RAFT stage whose reward needs each prompt's `answer` column."""
    root = tmp_path_factory.mktemp("run")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n" for i in range(4)))
    (root / "rewards.py").write_text(REWARD_FILE)
    config = RaftConfig.from_dict({
        "run": {"output_dir": str(root / "run")},
        "model": {"path": str(model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(root / "prompts.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 2, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 6},
        "reward": {"terms": [f"{root / 'rewards.py'}:matches"]},
        "tracking": {"report": False},
    })
    return train(config).run_dir


def test_sample_gives_k_responses_scored_by_the_runs_reward(run_dir):
    target = load_target(run_dir)
    results, problem = sample_responses(target, "Say 3", 3, target.config.generation,
                                        columns={"answer": "3"})
    assert problem is None and len(results) == 3
    assert [r.reward for r in results] == [float("3" in r.text) for r in results]


def test_cli_sample_prints_each_sample_with_its_reward(run_dir, capsys):
    args = ["sample", str(run_dir), "--prompt", "Say 3", "--n", "2", "--column", "answer=3"]
    assert cli_main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "--- sample 1/2 reward " in out and "--- sample 2/2 reward " in out


def test_sample_says_which_column_a_reward_lacks(run_dir, capsys):
    assert cli_main(["sample", str(run_dir), "--prompt", "Say 3", "--n", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reward: not computed" in out and "--column KEY=VALUE" in out


def test_sample_from_a_plain_model_has_no_rewards(model_dir):
    target = load_target(model_dir)
    results, problem = sample_responses(target, "Say 3", 2, short(target))
    assert [r.reward for r in results] == [None, None] and problem is None


def test_chat_sends_the_whole_conversation_each_turn(model_dir, monkeypatch):
    target = load_target(model_dir)
    prompts = []
    real_generate = chat_module.generate

    def spy(model, tokenizer, token_ids, *args, **kwargs):
        prompts.append(tokenizer.decode(token_ids[0]))
        return real_generate(model, tokenizer, token_ids, *args, **kwargs)

    monkeypatch.setattr(chat_module, "generate", spy)
    lines = iter(["Hi", "And you?", "/exit"])
    messages = chat(target, short(target), read_line=lambda _: next(lines),
                    write=lambda _: None)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    first_reply = messages[1]["content"]
    assert prompts[-1].startswith(f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                  f"{first_reply}")
    assert "<|im_start|>user\nAnd you?<|im_end|>\n<|im_start|>assistant\n" in prompts[-1]


def test_help_and_reset_are_handled_by_chat_not_sent_to_the_model(model_dir, monkeypatch):
    target = load_target(model_dir)
    sent = []
    real_generate = chat_module.generate

    def spy(model, tokenizer, token_ids, *args, **kwargs):
        sent.append(tokenizer.decode(token_ids[0]))
        return real_generate(model, tokenizer, token_ids, *args, **kwargs)

    monkeypatch.setattr(chat_module, "generate", spy)
    lines = iter(["/help", "Hi", "/reset", "/nonsense", "Again", "/exit"])
    shown: list[str] = []
    messages = chat(target, short(target, 2), read_line=lambda _: next(lines),
                    write=shown.append)
    assert not any("/help" in p or "/reset" in p or "/nonsense" in p for p in sent)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Again"]  # reset forgot
    assert sent[-1].startswith("<|im_start|>user\nAgain<|im_end|>")
    text = "".join(shown)
    assert "/reset" in text and "forgotten" in text and "unknown command /nonsense" in text


def test_chat_replies_get_chats_own_length_not_the_runs(run_dir, monkeypatch):
    used = []
    monkeypatch.setattr(chat_module, "chat", lambda target, generation, **_: used.append(
        generation.max_new_tokens) or [])
    assert cli_main(["chat", str(run_dir)]) == 0
    assert cli_main(["chat", str(run_dir), "--max-new-tokens", "40"]) == 0
    assert used == [256, 40]  # the run samples 6 tokens per response


def test_a_reply_is_written_in_pieces_as_it_is_sampled(model_dir):
    target = load_target(model_dir)
    settings = short(target)
    pieces: list[str] = []
    reply = stream_reply(target, [{"role": "user", "content": "Hi"}], settings, pieces.append)
    assert "".join(pieces) == reply
    assert len(pieces) >= 2


def test_chat_refuses_a_model_without_chat_template(model_dir):
    target = load_target(model_dir)
    target.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        chat(target, target.config.generation, read_line=lambda _: "/exit")


def read_until(fd: int, marker: str, seen: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                break
    return seen


def test_chat_in_a_terminal_streams_replies_and_quits_on_ctrl_d(model_dir):
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "raftlm", "chat", str(model_dir), "--max-new-tokens", "8"],
        stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    try:
        seen = read_until(leader, "you> ", "")
        os.write(leader, b"Hello\n")
        seen = read_until(leader, "you> ", seen.replace("you> ", "", 1))
        os.write(leader, b"\x04")  # Ctrl-D: end of input
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        os.close(leader)
    assert "assistant> " in seen
    assert "Traceback" not in seen
