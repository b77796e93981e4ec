"""YAML configuration with command-line overrides (``key.sub=value``)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

CONFIG_DIR = Path(os.environ.get("CAAXR_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


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
    """Load ``configs/<name>.yaml`` (or a path) and apply ``key.sub=value`` overrides."""
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
