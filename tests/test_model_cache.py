"""The cache of converted GGUF models: safe to fill from two processes at once, listable and
cleanable (`raftlm cache`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_bpe_model

from raftlm.cli import main as cli_main
from raftlm.config import ModelConfig
from raftlm.models.cache import entry_lock
from raftlm.models.loading import materialize_model
from raftlm.tools.export import export

SRC = Path(__file__).resolve().parents[1] / "src"

# Each process gets ready, waits for the other, then converts; the tokenizer's load is slowed
# so that both are past the "already converted?" check before either has renamed its copy.
CONVERT = """
import sys, time
from pathlib import Path
from raftlm.config import ModelConfig
from raftlm.models import loading

gguf, cache, me, other = sys.argv[1:]
real = loading.AutoTokenizer.from_pretrained
def slow(*args, **kwargs):
    time.sleep(1.0)
    return real(*args, **kwargs)
loading.AutoTokenizer.from_pretrained = slow
Path(me).touch()
while not Path(other).exists():
    time.sleep(0.01)
print(loading.materialize_model(ModelConfig(path=gguf, cache_dir=cache)))
"""


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory) -> Path:
    """A tiny model exported as a GGUF file (what `raftlm sample x.gguf` converts)."""
    root = tmp_path_factory.mktemp("gguf")
    return export(save_tiny_bpe_model(root / "model"), root / "tiny.gguf", "gguf")


def test_two_processes_converting_one_model_at_once_both_get_it(gguf_model, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]
    children = [subprocess.Popen([sys.executable, "-c", CONVERT, str(gguf_model), str(cache),
                                  str(me), str(other)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for me, other in [ready, ready[::-1]]]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 0, err[-2000:]
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(folders) == 1
    (folder,) = folders
    assert (Path(folder) / "config.json").is_file()
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [Path(folder).name]
    assert not [p for p in cache.iterdir() if ".converting-" in p.name]  # no leftovers


def test_a_conversion_is_readable_as_the_umask_allows(gguf_model, tmp_path):
    old = os.umask(0o022)
    try:
        folder = materialize_model(ModelConfig(path=str(gguf_model),
                                               cache_dir=str(tmp_path / "cache")))
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755


def test_cache_list_shows_each_conversion_with_its_size(gguf_model, tmp_path, capsys):
    cache = tmp_path / "cache"
    folder = materialize_model(ModelConfig(path=str(gguf_model), cache_dir=str(cache)))
    capsys.readouterr()
    assert cli_main(["cache", "list", "--dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert str(folder) in out and " KB  " in out
    assert "1 converted model(s)" in out and "raftlm cache clean" in out


def test_cache_clean_deletes_conversions_but_not_one_in_progress(gguf_model, tmp_path, capsys):
    cache = tmp_path / "cache"
    done = materialize_model(ModelConfig(path=str(gguf_model), cache_dir=str(cache)))
    busy = cache / "other-0123456789"
    busy.mkdir()
    left = cache / ".gone-0123456789.converting-abc"  # a killed conversion's staging folder
    left.mkdir()
    with entry_lock(busy):  # another raftlm converting it now
        assert cli_main(["cache", "clean", "--dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert not done.exists() and not left.exists() and busy.exists()
    assert f"kept {busy}" in out and "deleted 2 converted model(s)" in out
    assert sorted(p.name for p in cache.iterdir()) == [".other-0123456789.lock", busy.name]
