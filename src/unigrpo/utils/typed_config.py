"""Typed configuration: nested dataclasses <- YAML + ``key=value`` overrides.

Rules (docs/design.md; tested in tests/test_config.py): an unknown or misspelled key is an error, a value of the wrong type is an
error, and every error is one line that names the dotted key. No silent defaults, no coercion
beyond the obvious (an int where a float is expected; a YAML list where a tuple is expected).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

__all__ = ["ConfigError", "apply_overrides", "from_dict", "kind_of", "load", "parse_override", "require", "to_dict"]


class ConfigError(ValueError):
    """A bad configuration; the message starts with the offending dotted key."""


def require(ok: bool, key: str, msg: str) -> None:
    """A cross-field check of ``validate`` (or of a section's ``check``): ConfigError ``key: msg`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (converted where harmless)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if all(dataclasses.is_dataclass(a) for a in args):  # sections told apart by their `kind`
            return _convert_kind_union(value, args, key)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is float:
        # YAML reads "1e-6" as a string; accept numeric strings and ints for float fields.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not a user error


def kind_of(section: type) -> str:
    """The ``kind`` a section class stands for: its ``kind: Literal["name"]`` field."""
    (name,) = get_args(typing.get_type_hints(section)["kind"])
    return name


def _convert_kind_union(value: Any, sections: tuple, key: str) -> Any:
    """A section whose fields depend on its ``kind`` (e.g. ``model.kind: tiny | hf``): the kind
    picks the dataclass, which then checks the other keys (the first section is the default)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping for section, got {value!r}")
    by_kind = {kind_of(s): s for s in sections}
    kind = value.get("kind", kind_of(sections[0]))
    if not isinstance(kind, str) or kind not in by_kind:  # a list is unhashable: not a dict lookup
        raise ConfigError(f"{key}.kind: must be one of {', '.join(repr(k) for k in by_kind)}, got {kind!r}")
    return from_dict(by_kind[kind], value, prefix=key + ".", context=f" for {key}.kind={kind!r}")


def from_dict(cls: type, data: dict, prefix: str = "", context: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and bad types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), sorted(names), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"{prefix}{k}: unknown key{context}{hint}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict of built-ins (tuples become lists, for YAML/JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"algo.group_size=8"`` -> (["algo", "group_size"], 8); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: overrides must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: empty key in override")
    try:
        return key.split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: invalid YAML value {raw!r} ({_yaml_problem(e)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error's cause in a few words (its str is several lines)."""
    return str(getattr(e, "problem", None) or getattr(e, "reason", None) or e.__class__.__name__).replace("\n", " ")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides to a nested dict (before typing, so types are checked once)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node[path[-1]] = value
    return data


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(f"{key}: duplicate key (line {key_node.start_mark.line + 1}); it is given twice "
                              f"in the same section")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Read YAML at ``path`` (optional), apply overrides, and build ``cls``."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.load(p.read_bytes().decode("utf-8-sig"), Loader=_StrictLoader) or {}  # a SafeLoader
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
        except RecursionError:
            raise ConfigError(f"{p}: invalid YAML (nested too deeply)") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{p}: invalid YAML{where} ({_yaml_problem(e)})") from None
    return from_dict(cls, apply_overrides(data, list(overrides or [])))
