"""Relative paths in a config file are relative to the file's folder, as most tools read them:
`raftlm train --config capitals/config.yaml` and `cd capitals && raftlm train --config
config.yaml` load the same prompts. `--set` values and `run.output_dir` stay relative to the
working folder (where you typed them; runs land where you run).

For one release a path that exists only relative to the working folder (the rule before) still
loads, with a one-line note.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

# Where a config names a file or folder: (section path, key); "[]" walks a list of sections.
FILE_FIELDS = (("data", "train_file"), ("data", "eval_file"), ("data", "dataset"),
               ("model", "path"), ("reward.terms[]", "name"), ("reward.terms[]", "model"),
               ("rollout", "tools[]"), ("rollout", "environment"),
               ("evaluation.sets[]", "file"), ("data.anchor", "path"))
# Names that may also be something other than a path (a dataset in the HF cache, a model
# name, a built-in reward): rewritten only when the path exists beside the config file.
MAYBE_NOT_PATHS = {("data", "dataset"), ("model", "path"), ("reward.terms[]", "name")}


def relative_to_file(raw: dict, config_file: Path) -> dict:
    """A copy of the parsed config with its relative paths resolved against `config_file`'s
    folder (`file.py:fn` specs included)."""
    raw, base = copy.deepcopy(raw), config_file.resolve().parent
    terms = (raw.get("reward") or {}).get("terms") if isinstance(raw.get("reward"), dict) else None
    if isinstance(terms, list):  # `- file.py:fn`, a term written as its name alone
        raw["reward"]["terms"] = [{"name": t} if isinstance(t, str) else t for t in terms]
    for section_path, key in FILE_FIELDS:
        for section in _sections(raw, section_path.split(".")):
            many = key.endswith("[]")
            name = key.removesuffix("[]")
            values = section.get(name)
            if values is None:
                continue
            items = values if many and isinstance(values, list) else [values]
            resolved = [_resolve(v, base, (section_path, key) in MAYBE_NOT_PATHS, config_file,
                                 f"{section_path}.{key}") for v in items]
            section[name] = resolved if many and isinstance(values, list) else resolved[0]
    return raw


def _sections(node: Any, parts: list[str]) -> list[dict]:
    if not parts:
        return [node] if isinstance(node, dict) else []
    head, rest = parts[0], parts[1:]
    many = head.endswith("[]")
    child = node.get(head.removesuffix("[]")) if isinstance(node, dict) else None
    if many:
        return [s for item in (child if isinstance(child, list) else []) for s in
                _sections(item, rest)]
    return _sections(child, rest)


def _resolve(value: Any, base: Path, maybe_not_path: bool, config_file: Path,
             field: str) -> Any:
    if not isinstance(value, str) or not value:
        return value
    target, sep, attr = value.rpartition(":")
    spec = bool(sep and target and attr and (target.endswith(".py") or "/" in target))
    path_text = target if spec else value
    if sep and not spec:
        return value  # `pkg.mod:fn`, `embedded:name`: not a path
    path = Path(path_text).expanduser()
    if path.is_absolute():
        return value
    beside = base / path
    if beside.exists():
        return f"{beside}{sep}{attr}" if spec else str(beside)
    if maybe_not_path or ("/" not in path_text and "." not in path_text):
        return value  # a name (a built-in tool, a cached dataset), not a file
    if path.exists():  # the rule before: relative to the working folder
        print(f"raftlm: note: {config_file}: {field} {path_text!r} is read relative to the "
              f"working folder; relative paths in a config are relative to its folder (write "
              f"{path.resolve()} or a path from {base}); this fallback ends with the next "
              "release", file=sys.stderr)
        return value
    return f"{beside}{sep}{attr}" if spec else str(beside)
