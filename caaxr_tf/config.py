"""Configuration: YAML files, command-line overrides (``key.sub=value``) and strict typed loading.

Settings are read as YAML mappings, layered (``deep_merge``), overridden (``apply_overrides``)
and then turned into dataclasses by ``from_mapping``, which refuses unknown keys (a typo is an
error naming the valid keys) and values of the wrong type or range.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

T = TypeVar("T")


def packaged_config_dir() -> Path:
    """The folder of the packaged YAML files, ``caaxr_tf/configs``, found with importlib.resources
    (a file-system install: wheel, editable or source tree; not a zip import)."""
    return Path(str(importlib.resources.files("caaxr_tf").joinpath("configs")))


# The YAML files ship inside the package (caaxr_tf/configs, package data), so an installed wheel
# finds them wherever it runs from; CAAXR_CONFIG_DIR points at another folder of the same files.
CONFIG_DIR = Path(os.environ["CAAXR_CONFIG_DIR"]) if os.environ.get("CAAXR_CONFIG_DIR") else packaged_config_dir()


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from ``path``; ``FileNotFoundError`` / ``ValueError`` name the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
    except FileNotFoundError as error:
        raise FileNotFoundError(f"config file not found: {path}") from error
    except IsADirectoryError as error:
        raise ValueError(f"{path}: is a folder, not a YAML file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(name: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load ``caaxr_tf/configs/<name>.yaml`` (or a path) and apply ``key.sub=value`` overrides."""
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    return apply_overrides(load_yaml(path), overrides)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``config`` with each ``a.b.c=value`` applied; values are parsed as YAML.

    An override keeps the shape of what it replaces: a section (mapping) or a list cannot
    become a scalar (``caaxr=[1,2]``, ``optimizer=5``), so a typo fails here, naming the
    override, rather than as a traceback deep inside a reader. Values are read with YAML's
    safe loader: tags such as ``!!python/object`` are an error.
    """
    result = copy.deepcopy(dict(config))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ValueError(f"override {item!r} has an empty key")
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a mapping")
            node = child
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: invalid value ({' '.join(str(error).split())})") from None
        current = node.get(keys[-1])
        if isinstance(current, dict) and not isinstance(value, dict):
            raise ValueError(
                f"override {item!r}: {dotted.strip()!r} is a section with keys {sorted(current)}; "
                f"set one of them (e.g. {dotted.strip()}.{next(iter(current), 'key')}=...)"
            )
        if isinstance(current, list) and not isinstance(value, list):
            raise ValueError(f"override {item!r}: {dotted.strip()!r} is a list; write it as [a, b, ...]")
        node[keys[-1]] = value
    return result


# --- typed, strict configuration ---------------------------------------------------------


class ConfigError(ValueError):
    """A setting that cannot be used, found before any work starts: names the key and what is
    valid."""


def field_label(field: dataclasses.Field, where: str) -> str:
    return field.metadata.get("label") or (f"{where}.{field.name}" if where else field.name)


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, strictly.

    An unknown key is an error that names it (with the closest valid key) and lists the valid
    keys; a missing required key, a value of the wrong type or outside the range that the
    field's metadata gives (``min``, ``gt``, ``max``, ``finite``) is an error naming the key. Nested
    dataclasses, ``Literal`` choices, ``X | None``, lists, tuples and ``dict`` fields are
    checked recursively. ``where`` prefixes the key names in messages (e.g. ``optimizer``).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_known_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key {field_label(field, where)!r}")
            continue
        values[name] = _coerce(data[name], hints[name], field, where)
    return cls(**values)


def check_known_keys(data: Mapping[str, Any], valid: Iterable[str], where: str = "", what: str = "key",
                     listed: str = "valid keys") -> None:
    """ConfigError for the first key of ``data`` not in ``valid``: names it, the closest valid
    key (did you mean ...?) and all the valid ones."""
    valid = list(valid)
    unknown = [key for key in data if key not in valid]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, [str(v) for v in valid], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        place = f" in {where}" if where else ""
        raise ConfigError(f"unknown {what} {key!r}{place}{hint}; {listed}: {', '.join(sorted(map(str, valid)))}")


def check_partial(cls: type, data: Mapping[str, Any] | None, where: str = "") -> None:
    """Check the settings that ``data`` gives of the dataclass ``cls`` as `from_mapping` does,
    without requiring any: for one layer of settings (a section of a YAML file) that is merged
    with others before the whole is read. Nested dataclasses given as mappings are checked the
    same way."""
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_known_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        annotation, field = hints[name], fields[name]
        options = [a for a in typing.get_args(annotation) if a is not type(None)] \
            if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
        nested = next((a for a in options if dataclasses.is_dataclass(a)), None)
        if nested is not None and isinstance(value, Mapping):
            check_partial(nested, value, field_label(field, where))
        else:
            _coerce(value, annotation, field, where)


def to_mapping(obj: Any) -> Any:
    """Plain YAML-ready data of a config dataclass (tuples as lists). A nested dataclass with a
    ``to_mapping`` method decides its own form (e.g. leaving out settings not given)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return _plain(obj)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_mapping() if hasattr(value, "to_mapping") else to_mapping(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(value: Any, annotation: Any, field: dataclasses.Field, where: str) -> Any:
    label = field_label(field, where)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], field, where)
        for option in options:
            try:
                return _coerce(value, option, field, where)
            except ConfigError:
                continue
        raise ConfigError(f"{label} has an unusable value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{label} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else from_mapping(annotation, value, label)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r}")
        return value
    if annotation is int:
        low = field.metadata.get("min")
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            bound = f" >= {low}" if low is not None else ""
            raise ConfigError(f"{label} must be an integer{bound}, got {value!r}")
        return value
    if annotation is float:
        return _coerce_float(value, field, label)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be text, got {value!r}")
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label} must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, field, where) for v in value]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{label} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"{label}: unsupported annotation {annotation!r}")


def _coerce_float(value: Any, field: dataclasses.Field, label: str) -> float:
    finite, greater = field.metadata.get("finite", False), field.metadata.get("gt")
    low, high = field.metadata.get("min"), field.metadata.get("max")
    condition = " ".join(p for p in ("finite" if finite else "", "number") if p)
    condition += f" > {greater}" if greater is not None else f" >= {low}" if low is not None else ""
    if high is not None:
        condition += f"{' and' if greater is not None or low is not None else ''} <= {high}"
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = f" (YAML reads {value} as text: write {_yaml_float(value)})"
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = (not finite or math.isfinite(number)) and (greater is None or number > greater) \
            and (low is None or number >= low) and (high is None or number <= high)
    if not ok:
        raise ConfigError(f"{label} must be a {condition}, got {value!r}{hint}")
    return float(value)


def _yaml_float(text: str) -> str:
    mantissa, _, exponent = text.lower().partition("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}" if exponent else text
