"""docs/tutorial.md works as written: its commands run, in order, on a tiny model.

Every line of the tutorial's ```bash blocks is run through the CLI in a fresh folder. The model
is swapped for a tiny random one and the run made small (the flags below); everything else is
the tutorial's text, so a renamed flag, a moved file or a changed command breaks this test.
"""

from __future__ import annotations

import io
import re
import shlex
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_model

from raftlm.cli import main as cli_main

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"
CHAT_INPUT = "What is 12 + 7?\n/exit\n"


def tutorial_commands() -> list[tuple[list[str], str | None]]:
    """(argv, the ```text block right after the command's block, if any) for each command."""
    text = TUTORIAL.read_text()
    found = []
    for match in re.finditer(r"```bash\n(.*?)```\n(?:\n```text\n(.*?)```)?", text, re.S):
        lines = [shlex.split(line, comments=True) for line in match[1].splitlines()]
        lines = [argv for argv in lines if argv]
        for i, argv in enumerate(lines):
            found.append((argv, match[2] if i == len(lines) - 1 else None))
    return found


def smaller(argv: list[str], tiny: Path) -> list[str]:
    """The tutorial's command on the tiny model, with a run small enough for a test."""
    extra = {
        "init": ["--model", str(tiny)],
        "train": ["--set", "raft.prompts_per_stage=2", "--set", "raft.samples_per_prompt=2",
                  "--set", "generation.max_new_tokens=4", "--set", "data.max_eval_prompts=2"],
        "eval": ["--set", "generation.max_new_tokens=4", "--set", "data.max_eval_prompts=2"],
        "sample": ["--max-new-tokens", "4"],
        "chat": ["--max-new-tokens", "4"],
    }
    return argv[1:] + extra.get(argv[1], [])


def test_the_tutorial_covers_a_first_hour():
    commands = [argv[1] for argv, _ in tutorial_commands()]
    assert all(argv[0] == "raftlm" for argv, _ in tutorial_commands())
    for step in ["init", "train", "eval", "export", "sample", "chat"]:
        assert step in commands, f"docs/tutorial.md no longer runs `raftlm {step}`"
    assert commands.index("init") < commands.index("train") < commands.index("eval")


def skeleton(line: str) -> str:
    """A line with its numbers, timings and finish reason masked: what any run prints alike."""
    line = re.sub(r"-?\d+(\.\d+)?|\bNone\b|n/a", "N", line)
    return " ".join(re.sub(r"\((eos|length|stop)\)", "(R)", line).split())


def checked_lines(command: str, text: str) -> list[str]:
    """The lines of a shown output that a tiny run prints alike (not replies, not stages > 0:
    their content depends on what the model sampled)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if command == "sample":
        return [line for line in lines if line.startswith("--- sample")]
    if command == "train":
        return [line for line in lines
                if not line.startswith("stage ") or line.startswith("stage 0/")]
    return lines if command in ("init", "eval", "export") else []


def test_the_tutorials_commands_run_as_written_and_print_what_it_shows(
        tmp_path, monkeypatch, capsys):
    tiny = save_tiny_model(tmp_path / "tiny-model")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for argv, shown in tutorial_commands():
        monkeypatch.setattr(sys, "stdin", io.StringIO(CHAT_INPUT))
        code = cli_main(smaller(argv, tiny))
        out, err = capsys.readouterr()
        assert code == 0, f"`{shlex.join(argv)}` failed:\n{err}"
        assert "Traceback" not in err
        printed = {skeleton(line) for line in out.splitlines()}
        for line in checked_lines(argv[1], shown or ""):
            assert skeleton(line) in printed, (
                f"docs/tutorial.md shows `{line}` after `{shlex.join(argv)}`, which prints:\n{out}")


@pytest.mark.parametrize("command", ["init", "train", "eval", "export", "sample"])
def test_the_tutorial_shows_what_the_command_prints(command):
    shown = [text for argv, text in tutorial_commands() if argv[1] == command and text]
    assert shown and checked_lines(command, shown[0]), (
        f"docs/tutorial.md shows no output of `raftlm {command}`")
