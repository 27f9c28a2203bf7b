"""What raftlm writes is as readable as the user's umask allows: files written to a temporary
name and renamed (mkstemp: 0600) and folders that appear complete (mkdtemp: 0700) included."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from raftlm.run.rundir import RunDir, atomic_write_text, current_umask
from raftlm.tools.export import export


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_current_umask_reads_the_processes_umask():
    with umask(0o027):
        assert current_umask() == 0o027


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_file_written_atomically_has_the_umasks_mode(tmp_path, mask, expected):
    with umask(mask):
        atomic_write_text(tmp_path / "metrics.jsonl", "{}\n")
    assert mode(tmp_path / "metrics.jsonl") == expected


def test_a_checkpoint_folder_has_the_umasks_mode(tmp_path):
    def save_policy(folder: Path) -> None:
        folder.mkdir()
        (folder / "weights").write_bytes(b"w")

    with umask(0o022):
        folder = RunDir(tmp_path).save_checkpoint(1, save_policy, {}, {"stage": 1}, keep=0)
    assert mode(folder) == 0o755 and mode(folder / "policy" / "weights") == 0o644


def test_an_exported_hf_folder_has_the_umasks_mode(tiny_model_dir, tmp_path):
    with umask(0o027):  # group may read, others may not: export must not widen it to 0755
        out = export(tiny_model_dir, tmp_path / "exported", "hf")
    assert mode(out) == 0o750 and mode(out / "config.json") == 0o640
