"""The one registry shape: a table of frozen records keyed by name, next to their
implementations (collectors, weightings, losses, generation backends, reward-term kinds).

Code asks a record for its flags (`COLLECTORS[name].rewards_between_rounds`), never compares a
choice's name. Where a config field allows it, `pkg.mod:obj` or `file.py:obj` names a record of
your own outside the table (torchtune's `_component_`; reward functions have always had it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, TypeVar

from raftlm.config.schema import ConfigError

T = TypeVar("T")


def is_import_path(name: str) -> bool:
    """`pkg.mod:obj` or `file.py:obj` rather than a registry key."""
    target, sep, attr = name.rpartition(":")
    return bool(sep and target and attr)


def load_object(spec: str, what: str) -> Any:
    """The object ``package.module:name`` or ``path/to/file.py:name`` (relative to the working
    folder) names; ConfigError naming `what` when it cannot be loaded."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"{what} {spec!r}: expected 'package.module:name' or 'file.py:name'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{what} {spec!r}: file not found: {path}")
        name = f"raftlm_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # so pickling and dataclasses inside the file work
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise ConfigError(f"{what} {spec!r}: importing {path} failed: {err!r}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ConfigError(f"{what} {spec!r}: cannot import module '{target}': {err}") from err
    found = getattr(module, attr, None)
    if found is None:
        raise ConfigError(f"{what} {spec!r}: '{target}' has no attribute '{attr}'")
    return found


def lookup(table: dict[str, T], name: str, field: str, kind: type) -> T:
    """`table[name]`, or the `kind` record an import path names; ConfigError naming `field`."""
    if name in table:
        return table[name]
    if not is_import_path(name):
        raise ConfigError(f"{field}: expected one of {', '.join(table)} or "
                          f"'pkg.mod:obj' / 'file.py:obj', got {name!r}")
    found = load_object(name, field)
    if not isinstance(found, kind):
        raise ConfigError(f"{field} {name!r}: expected a {kind.__name__} record, "
                          f"got {type(found).__name__}")
    return found
