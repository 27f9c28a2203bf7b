"""The model a user names: what is not here is refused in one line that says what to do."""

from __future__ import annotations

import pytest

from raftlm.cli import main as cli_main
from raftlm.config import EMBEDDED_MODEL, ModelConfig
from raftlm.errors import InvalidInput
from raftlm.models import names
from raftlm.models.loading import resolve_model_source
from raftlm.tools.init import init_task


def test_a_hub_name_says_raftlm_never_downloads_and_how_to_get_the_folder(tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(names, "_hub_cache_folder", lambda name: None)  # not in the HF cache
    with pytest.raises(FileNotFoundError) as caught:
        resolve_model_source(ModelConfig(path="HuggingFaceTB/SmolLM2-135M"))
    message = str(caught.value)
    assert "raftlm never downloads" in message
    assert "hf download HuggingFaceTB/SmolLM2-135M --local-dir" in message
    assert EMBEDDED_MODEL in message


def test_a_hub_name_in_the_local_hugging_face_cache_is_pointed_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(names, "_hub_cache_folder", lambda name: "/hf/snapshots/abc")
    with pytest.raises(FileNotFoundError, match="use model.path /hf/snapshots/abc"):
        resolve_model_source(ModelConfig(path="HuggingFaceTB/SmolLM2-135M"))


def test_a_misspelled_embedded_name_lists_the_valid_ones():
    with pytest.raises(InvalidInput, match=f"the embedded models are: {EMBEDDED_MODEL}"):
        resolve_model_source(ModelConfig(path="embedded:smollm2-135m"))


def test_init_refuses_a_model_that_is_not_here(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model: no such folder or file"):
        init_task(tmp_path / "task", model=str(tmp_path / "no-model"))
    assert not (tmp_path / "task").exists()


def test_init_refuses_a_misspelled_embedded_name_in_one_line(tmp_path, capsys):
    assert cli_main(["init", str(tmp_path / "task"), "--model", "embedded:smol"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and EMBEDDED_MODEL in err


def test_sample_on_a_hub_name_says_raftlm_never_downloads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(names, "_hub_cache_folder", lambda name: None)
    assert cli_main(["sample", "HuggingFaceTB/SmolLM2-135M", "--prompt", "Hi"]) != 0
    assert "raftlm never downloads" in capsys.readouterr().err
