"""Typed dataclass configs as the single source of truth: CLI options, YAML/TOML files, overrides.

Every field of a (nested) dataclass becomes a ``--section.field`` option whose help text is the
attribute docstring written under the field, with its default. Files and command-line overrides go
through the same strict conversion: an unknown key or a value of the wrong type is a
:class:`ConfigError` whose one-line message names the key and says what would be accepted.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the fix."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right under a field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def describe_type(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{describe_type(inner)} or none"
    if get_origin(tp) is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return f"comma-separated {describe_type(get_args(tp)[0])}s"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a file or command-line value to ``tp``; raise :class:`ConfigError` naming ``key``."""
    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return convert(value, inner, key)
    origin = get_origin(tp)
    try:
        if origin is Literal:
            allowed = get_args(tp)
            if value not in allowed:
                raise ValueError
            return value
        if origin in (list, tuple):
            (item,) = get_args(tp)[:1]
            items = value.split(",") if isinstance(value, str) else list(value)
            out = [convert(v.strip() if isinstance(v, str) else v, item, key) for v in items if v != ""]
            return tuple(out) if origin is tuple else out
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: {value!r} is not a valid {describe_type(tp)}") from None
    return value


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type, data: dict, prefix: str = "", source: str = "config") -> Any:
    """Build dataclass ``cls`` from a nested dict, strictly (unknown keys are errors)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or source}: expected a mapping of keys, got {type(data).__name__}")
    hints = _resolved_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {full!r} in {source}{_suggest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, f"{full}.", source)
        else:
            kwargs[key] = convert(value, tp, full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) experiment file into a dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass the path of a .yaml or .toml file")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            if ext == ".toml":
                import tomllib

                data = tomllib.load(f)
            elif ext in (".yaml", ".yml"):
                data = yaml.safe_load(f) or {}
            else:
                raise ConfigError(f"config file {path!r}: unknown extension {ext!r}; use .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as exc:  # parse errors from yaml/tomllib
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {path!r} could not be parsed: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys at the top level")
    return data


def dump_yaml(obj: Any, path: str) -> None:
    """Write ``obj`` (a dataclass) as YAML, atomically: a reader sees the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)
    os.replace(tmp, path)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "", defaults: Any = None) -> None:
    """Add ``--prefix.field`` options for every field of ``cls`` (recursing into nested dataclasses).

    Options default to ``argparse.SUPPRESS`` so that only what the user typed overrides the file
    and preset values; the help shows the effective default.
    """
    docs = field_docs(cls)
    hints = _resolved_types(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or cls.__name__, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, f"{prefix}{f.name}.", default)
            continue
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help_text = f"{docs.get(f.name, '')} [{describe_type(tp)}; default: {shown}]".strip()
        extra = {"nargs": "?", "const": "true"} if tp is bool else {}
        group.add_argument(f"--{prefix}{f.name}", dest=f"{prefix}{f.name}", default=argparse.SUPPRESS,
                           metavar=f.name.upper(), help=help_text.replace("%", "%%"), **extra)


def overrides_from_namespace(ns: argparse.Namespace, cls: type) -> dict:
    """The dotted options the user typed, as a nested dict (values still strings)."""
    out: dict = {}
    valid = set(_dotted_names(cls))
    for key, value in vars(ns).items():
        if key not in valid:
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _dotted_names(cls: type, prefix: str = "") -> list[str]:
    hints = _resolved_types(cls)
    names = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names += _dotted_names(hints[f.name], f"{prefix}{f.name}.")
        else:
            names.append(f"{prefix}{f.name}")
    return names
