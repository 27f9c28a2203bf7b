"""The cache of models raftlm converted (GGUF files dequantized to safetensors, once each):
an entry's name and lock, and `raftlm cache`'s listing and cleaning. No torch, so that listing
is quick.

An entry `CACHE/<gguf stem>-<key>/` is an HF folder; it appears complete (renamed from a dot-named
staging folder). `CACHE/.<entry>.lock` is flock'ed by the process that converts it: another
process that needs the same model waits for it instead of converting it again, and cleaning
skips it. The kernel drops a flock when its holder dies, however it dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def entry_for(cache_dir: str | Path, gguf_path: Path) -> Path:
    """The cache folder of `gguf_path`'s conversion; a changed file (size, time) gets a new one."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Path(cache_dir).expanduser() / f"{gguf_path.stem}-{key.hexdigest()[:10]}"


def staging_prefix(entry: Path) -> str:
    return f".{entry.name}.converting-"


@contextmanager
def entry_lock(entry: Path, wait: bool = True) -> Iterator[bool]:
    """Hold `entry`'s lock; yields True. Another process holds it: wait for it (saying so), or
    with ``wait=False`` yield False at once."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(entry.with_name(f".{entry.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            print(f"Waiting for another raftlm converting the model into {entry}...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


@dataclass
class CacheEntry:
    path: Path
    size: int  # bytes
    complete: bool  # False: what a killed conversion left (a staging folder)


def cache_entries(cache_dir: str | Path) -> list[CacheEntry]:
    """The converted models in `cache_dir` and the leftovers of killed conversions."""
    folder = Path(cache_dir).expanduser()
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() and (not path.name.startswith(".") or ".converting-" in path.name):
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            entries.append(CacheEntry(path, size, not path.name.startswith(".")))
    return entries


def clean_cache(cache_dir: str | Path) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Delete every entry no process is converting; returns (deleted, skipped as busy)."""
    deleted, busy = [], []
    for entry in cache_entries(cache_dir):
        name = entry.path.name
        owner = entry.path if entry.complete else entry.path.with_name(
            name[1:name.index(".converting-")])
        with entry_lock(owner, wait=False) as free:
            if not free:
                busy.append(entry)
                continue
            shutil.rmtree(entry.path)
            deleted.append(entry)
    for lock in Path(cache_dir).expanduser().glob(".*.lock"):
        owner = lock.with_name(lock.name[1:-len(".lock")])
        with entry_lock(owner, wait=False) as free:
            if free and not owner.exists():
                # A conversion that opened it just now may still convert alongside a later
                # one; the later rename then finds the entry there and uses it.
                lock.unlink()
    return deleted, busy


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"
