"""Checkpoint files that load without pickle, and a manifest that proves a checkpoint whole.

Trainer state (optimizer moments, schedule, step, RNG states) is split into its tensors, stored
with safetensors (`trainer_state.safetensors`), and everything else, stored as JSON
(`trainer_state.json`) with a placeholder where each tensor was. Loading runs no code from the
file: safetensors holds raw arrays, JSON plain values.

`manifest.json`, written last, lists every file of the checkpoint with its size and sha256;
`verify_manifest` re-reads them, so a checkpoint damaged after it was written (a truncated file,
a flipped byte, a file removed by hand) is noticed before a run resumes from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raftlm.errors import InvalidInput

TENSORS_FILE = "trainer_state.safetensors"
STATE_FILE = "trainer_state.json"
LEGACY_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"


def split_tensors(value: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """`value` as JSON-able data, its tensors moved into `tensors` under their path.

    Tuples, numpy arrays and dicts with non-string keys (optimizer state is keyed by parameter
    index) are tagged so that `join_tensors` gives back the same types.
    """
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        items = [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return {"__tuple__": items}
    if isinstance(value, list):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: split_tensors(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__items__": [[k, split_tensors(v, tensors, f"{path}.{k}")]
                              for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`."""
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if "__tuple__" in value:
        return tuple(join_tensors(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: join_tensors(v, tensors) for k, v in value["__items__"]}
    return {k: join_tensors(v, tensors) for k, v in value.items()}


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """`state` as `trainer_state.safetensors` + `trainer_state.json` in `folder`."""
    tensors: dict[str, torch.Tensor] = {}
    data = split_tensors(state, tensors)
    save_file(tensors, str(folder / TENSORS_FILE))
    (folder / STATE_FILE).write_text(json.dumps(data))


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The state `write_trainer_state` wrote; refuses the old pickle format with a clear error."""
    if not (folder / STATE_FILE).is_file() and (folder / LEGACY_FILE).is_file():
        raise InvalidInput(
            f"{folder / LEGACY_FILE}: checkpoint in the old pickle format, which raftlm no longer "
            "loads (unpickling can run arbitrary code); start the run again with --overwrite"
        )
    try:
        data = json.loads((folder / STATE_FILE).read_text())
        return join_tensors(data, load_file(str(folder / TENSORS_FILE)))
    except (OSError, ValueError, KeyError) as err:
        raise InvalidInput(f"{folder}: unreadable trainer state: {err}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """`manifest.json`: size and sha256 of every other file under `folder`."""
    files = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(folder: Path) -> str | None:
    """None when every file of the manifest is there with its size and hash, else what is not."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST_FILE}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} differs from its manifest (sha256)"
    return None
