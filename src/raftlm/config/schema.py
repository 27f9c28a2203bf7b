"""How config dataclasses are declared and loaded: fields with help and choices, typed conversion.

``config.py`` holds the dataclasses a user reads; this module is the machinery under them. A
value from YAML is converted by its field's type hint, read with ``typing.get_origin/get_args``
(``X | None``, ``list[X]``, ``dict[str, X]``, nested dataclasses, ``Literal``, scalars), so a
section nested anywhere loads as its dataclass, and a wrong value names its place in the file:
``reward.terms[1].weight must be float, got 'high'``.
Command-line overrides (``--set key.sub=value``) are applied to the raw mapping here too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
from dataclasses import field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from raftlm.errors import UserError

_NONE = type(None)
_SCALARS = (bool, int, float, str)


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names it."""


def option(default: Any, help: str, choices: tuple[str, ...] | None = None,
           import_path: bool = False) -> Any:
    """A dataclass field with a default and a help line (lists/dicts copied per instance).

    ``choices`` are the field's only valid values, written here once: ``--help`` lists them,
    ``validate`` checks them, and registries test that their keys equal them (``field_choices``).
    With ``import_path``, ``pkg.mod:obj`` or ``file.py:obj`` is valid too (a record of the
    user's own, which the registry loads: ``raftlm.config.registry.lookup``).
    """
    metadata: dict[str, Any] = {"help": help, "import_path": import_path}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_choices(cls: type, name: str) -> tuple[str, ...]:
    """The valid values of field ``name`` (dotted for nested sections) of dataclass ``cls``.

    Empty when the field takes any value of its type. A registry of implementations tests
    ``set(REGISTRY) == set(field_choices(TrainingConfig, "objective"))``.
    """
    *sections, last = name.split(".")
    for part in sections:
        cls = _section_type(_field_hints(cls)[part]) or _field_hints(cls)[part]
    f = {f.name: f for f in dataclasses.fields(cls)}[last]
    return _choices(f, _field_hints(cls)[last])


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every field of ``cls``, for ``--help``.

    A section's fields are listed under its name; an optional section (``X | None``) or a list
    of sections gets its own row, then its fields as ``name.field`` / ``name[].field``. A field
    with choices ends its help with them.
    """
    rows = []
    hints = _field_hints(cls)
    for f in dataclasses.fields(cls):
        name, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += field_help(hint, name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        if choices := _choices(f, hint):
            text += f" One of: {', '.join(choices)}."
        rows.append((name, text, _plain(default)))
        if (section := _section_type(hint)) is not None:
            rows += field_help(section, name + ("[]." if get_origin(hint) is list else "."))
    return rows


def build(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """Dataclass ``cls`` from a mapping of plain values; ConfigError names the key and ``where``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, "
                          f"got {raw!r}")
    hints = _field_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {names}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = convert(hints[key], value, where, prefix + key)
    return cls(**kwargs)


def convert(hint: Any, value: Any, where: str, name: str) -> Any:
    """``value`` (as parsed from YAML) as type ``hint``, or a ConfigError naming ``name``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        return _convert_union(args, value, where, name)
    if dataclasses.is_dataclass(hint):
        string_form = getattr(hint, "string_form", None)  # `- numeric_answer` for a RewardTerm
        if isinstance(value, str) and string_form:
            value = {string_form: value}
        return build(hint, {} if value is None else value, where, name + ".")
    if hint is Any:
        return value
    if value is None:
        raise ConfigError(f"{where}: {name} must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {name}: expected {_one_of(args)}, got {value!r}")
        return value
    if hint is list or origin is list:
        item = args[0] if args else Any
        if isinstance(value, str) and item in (str, Any):
            value = [value]  # `stop_strings: END` means one stop string
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
        return [convert(item, v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        item = args[1] if args else Any
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a mapping, got {value!r}")
        return {str(k): convert(item, v, where, f"{name}.{k}") for k, v in value.items()}
    if hint in _SCALARS:
        return _convert_scalar(hint, value, where, name)
    raise TypeError(f"config field {name}: the config loader cannot load type {hint!r}")


def check_values(section: Any, where: str, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ConfigError `WHERE.KEY: expected EXPECTED, got VALUE` for the first failed check,
    each (dotted key inside `section`, whether its value is fine, what is expected)."""
    for key, ok, expected in checks:
        if not ok:
            value = section
            for part in key.split("."):
                value = getattr(value, part)
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def check_choices(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first field anywhere in ``obj`` whose value is not a choice."""
    hints = _field_hints(type(obj))
    for f in dataclasses.fields(obj):
        name, value = prefix + f.name, getattr(obj, f.name)
        choices = _choices(f, hints[f.name])
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            own = f.metadata.get("import_path") and isinstance(item, str) and ":" in item
            if choices and item is not None and item not in choices and not own:
                at = f"{name}[{i}]" if isinstance(value, list) else name
                close = difflib.get_close_matches(str(item), choices, n=1, cutoff=0.6)
                fix = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{at}: expected {_one_of(choices)}, got {item!r}{fix}")
            if dataclasses.is_dataclass(item):
                check_choices(item, f"{name}[{i}]." if isinstance(value, list) else name + ".")


def _convert_union(args: tuple, value: Any, where: str, name: str) -> Any:
    options = [a for a in args if a is not _NONE]
    if value is None:
        if len(options) < len(args):
            return None
        raise ConfigError(f"{where}: {name} must not be null")
    if len(options) == 1:
        return convert(options[0], value, where, name)
    exact = [o for o in options if o in _SCALARS and type(value) is o]
    for option_type in exact + [o for o in options if o not in exact]:  # `int | str` keeps 3 an int
        try:
            return convert(option_type, value, where, name)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: {name} must be {_one_of([_kind(o) for o in options])}, "
                      f"got {value!r}")


def _kind(hint: Any) -> str:
    """A type as an error names it: `float`, `a list of float`, or a section's own `kind`."""
    if get_origin(hint) is list:
        return f"a list of {_kind(get_args(hint)[0])}"
    return getattr(hint, "kind", None) or getattr(hint, "__name__", str(hint))


def _convert_scalar(base: type, value: Any, where: str, name: str) -> Any:
    try:
        if isinstance(value, (dict, list)):  # str({...}) would hide a misplaced section
            raise ValueError(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"true", "1", "yes", "on"}:
                return True
            if str(value).lower() in {"false", "0", "no", "off"}:
                return False
            raise ValueError(value)
        if base in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be {base.__name__}, got {value!r}") from None


@functools.cache  # resolving a class's hints is slow; a dataclass's hints never change
def _field_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _section_type(hint: Any) -> type | None:
    """The dataclass inside ``X | None`` or ``list[X]``, else None."""
    inner = [a for a in get_args(hint) if a is not _NONE]
    if get_origin(hint) in (Union, types.UnionType, list) and len(inner) == 1:
        if dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _choices(f: dataclasses.Field, hint: Any) -> tuple:
    if "choices" in f.metadata:
        return f.metadata["choices"]
    inner = [a for a in get_args(hint) if a is not _NONE]
    if get_origin(hint) in (Union, types.UnionType) and len(inner) == 1:
        hint = inner[0]
    return get_args(hint) if get_origin(hint) is Literal else ()


def _one_of(choices: tuple) -> str:
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _plain(value: Any) -> Any:
    """Dataclasses in a default as plain dicts, as YAML would write them."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of ``raw`` with each ``a.b.c=value`` applied (value parsed as YAML, so numbers,
    lists and null work); the caller's dict is left as it was."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        _apply_override(raw, item)
    return raw


def check_override(cls: type, item: str) -> None:
    """Raise a ConfigError blaming `--set ITEM` (not the config file) when its key names no
    field of dataclass `cls` or its value does not convert to the field's type."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key.sub=value")
    key, _, text = item.partition("=")
    parts, hint = key.strip().split("."), cls
    for depth, part in enumerate(parts):
        section = hint if dataclasses.is_dataclass(hint) else _section_type(hint)
        if section is None or get_origin(hint) is list:
            raise ConfigError(f"--set {item}: {'.'.join(parts[:depth])} is not a section")
        names = [f.name for f in dataclasses.fields(section)]
        if part not in names:
            prefix = ".".join(parts[:depth] + [""])
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            fix = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {names}"
            raise ConfigError(f"--set {item}: unknown key '{prefix}{part}'{fix}")
        hint = _field_hints(section)[part]
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item}: the value is not YAML: {err}") from None
    convert(hint, value, "--set", key.strip())


def _apply_override(raw: dict, item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML, so numbers, lists and null work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, _, text = item.partition("=")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
