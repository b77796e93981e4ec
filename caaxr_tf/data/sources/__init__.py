"""The source registry: one reader module per data source, registered with its config section.

Every source module defines a config dataclass (its section of caaxr_tf/configs/data.yaml, with the same
defaults) and one reader, registered by name::

    @register_source("chexpert", section="chexpert", config=ChexpertConfig)
    def read(data_root: Path, config: ChexpertConfig) -> ReadResult: ...

A source that needs more than one section (``caaxr`` reads the BIMCV tree too) names them all:
its config dataclass then has one field per section, named after it. Callers go through
``read_source(name, data_root, data_config)``, which loads the sections strictly from the data
config (an unknown key is a ``ConfigError`` naming the valid keys) and calls the reader.
Readers never load the global config themselves: called directly with no config, they use the
dataclass defaults, which equal caaxr_tf/configs/data.yaml's values (a test checks that).

Adding a source = one module here, named after the source (``covid-ctset``:
``covid_ctset.py``), and its section in caaxr_tf/configs/data.yaml: ``SOURCES`` (a
``caaxr_tf.registry.Registry``) finds it, and imports it when the source is first looked up
(``available_sources`` lists names without importing anything, so the reading side can
validate protocols without OpenCV or pydicom).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from caaxr_tf.config import ConfigError, from_mapping
from caaxr_tf.data.records import ReadResult
from caaxr_tf.registry import Registry

C = TypeVar("C")
Reader = Callable[[Path, Any], ReadResult]


class UnknownSourceError(ValueError):
    """A source name (e.g. in caaxr_tf/configs/protocols.yaml) that no source module registers."""


@dataclass(frozen=True)
class SourceSpec:
    """A registered source: its name, the data.yaml sections its config is read from, the config
    dataclass and the reader ``read(data_root, config) -> ReadResult``."""

    name: str
    sections: tuple[str, ...]
    config: type
    read: Reader

    @property
    def description(self) -> str:
        """The first line of the reader's docstring."""
        return (self.read.__doc__ or "").strip().splitlines()[0] if self.read.__doc__ else ""


def _spec_origin(spec: SourceSpec) -> str:
    return spec.read.__module__


# A built-in source is the module of this package named after it (``-`` spelt ``_``): its names
# are known without importing any source module, and a lookup imports only the source's module.
SOURCES: Registry[SourceSpec] = Registry(
    "source", package=__name__, module_entry=lambda module: module.replace("_", "-"),
    error=UnknownSourceError, origin=_spec_origin)


def register_source(name: str, *, section: str | Sequence[str], config: type) -> Callable[[Reader], Reader]:
    """Decorator registering ``read(data_root, config)`` as the reader of source ``name``.

    ``section`` is the data.yaml section ``config`` is loaded from, or several sections: then
    ``config`` has one dataclass field per section, named after it.
    """
    sections = (section,) if isinstance(section, str) else tuple(section)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"source {name!r}: config must be a dataclass, got {config!r}")
    if len(sections) > 1:
        fields = {f.name for f in dataclasses.fields(config)}
        if fields != set(sections):
            raise TypeError(f"source {name!r}: a config read from sections {list(sections)} must have "
                            f"exactly one field per section, it has {sorted(fields)}")

    def decorator(read: Reader) -> Reader:
        SOURCES.register(name, SourceSpec(name, sections, config, read))
        return read

    return decorator


def available_sources() -> list[str]:
    """The source names (built-in and registered), sorted; imports no source module."""
    return SOURCES.names()


def get_source(name: str) -> SourceSpec:
    """The registered source ``name``; ``UnknownSourceError`` lists the known ones."""
    return SOURCES.get(name)


def data_sections() -> dict[str, list[str]]:
    """Each caaxr_tf/configs/data.yaml section and the sources that read it."""
    sections: dict[str, list[str]] = {}
    for spec in map(get_source, available_sources()):
        for section in spec.sections:
            sections.setdefault(section, []).append(spec.name)
    return {section: sorted(names) for section, names in sorted(sections.items())}


def check_data_config(data_config: Mapping[str, Any]) -> None:
    """Check a whole data config strictly: every top-level key is the section of a registered
    source, and every section loads into its source's config (``ConfigError`` otherwise)."""
    if not isinstance(data_config, Mapping):
        raise ConfigError(f"the data config must be a mapping of sections, got {data_config!r}")
    known = data_sections()
    for key in data_config:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown section {key!r} in the data config{hint}; "
                              f"valid sections: {', '.join(known)}")
    for name in available_sources():
        source_config(name, data_config)


def source_config(name: str, data_config: Mapping[str, Any] | None = None) -> Any:
    """The typed, strictly loaded config of source ``name`` from a whole data config (its
    section(s); absent sections and keys take the dataclass defaults)."""
    spec = get_source(name)
    data_config = data_config or {}
    if len(spec.sections) == 1:
        section = spec.sections[0]
        return from_mapping(spec.config, data_config.get(section), section)
    return coerce_sections(spec.config, data_config)


def coerce_config(config_class: type[C], config: C | Mapping[str, Any] | None, where: str) -> C:
    """``config`` as a ``config_class`` instance: itself, the defaults (None) or a section
    mapping loaded strictly with ``from_mapping`` (readers called directly with a dict)."""
    if config is None:
        return config_class()
    if isinstance(config, config_class):
        return config
    return from_mapping(config_class, config, where)


def coerce_sections(config_class: type[C], config: C | Mapping[str, Any] | None) -> C:
    """Like ``coerce_config`` for a config read from several sections: a mapping holds the
    sections (e.g. a whole data config; its other sections are ``check_data_config``'s business)."""
    if config is None:
        return config_class()
    if isinstance(config, config_class):
        return config
    if not isinstance(config, Mapping):
        raise ConfigError(f"{config_class.__name__} must be a mapping of sections, got {config!r}")
    names = {f.name for f in dataclasses.fields(config_class)}
    return from_mapping(config_class, {key: value for key, value in config.items() if key in names})


def resolve_root(data_root: str | os.PathLike, root: str) -> Path:
    """A source's folder: ``root`` (``~`` expanded) if absolute, else ``data_root / root``."""
    path = Path(os.path.expanduser(str(root)))
    return path if path.is_absolute() else Path(data_root) / path


def read_source(name: str, data_root: str | os.PathLike, data_config: Mapping[str, Any] | None = None) -> ReadResult:
    """Read source ``name`` under ``data_root`` with its sections of ``data_config`` (a whole
    data config such as ``load_config("data")``; None: the defaults).

    Raises:
        UnknownSourceError: no such source.
        ConfigError: a section has an unknown key or a value of the wrong type.
        SchemaError: a file of the source lacks its structure (raised by the reader).
    """
    spec = get_source(name)
    return spec.read(Path(data_root), source_config(name, data_config))


def __getattr__(name: str) -> Any:
    if name == "BUILTIN_SOURCE_MODULES":  # the older name of ``SOURCES.builtin_modules()``
        return SOURCES.builtin_modules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN_SOURCE_MODULES",
    "SOURCES",
    "SourceSpec",
    "UnknownSourceError",
    "available_sources",
    "check_data_config",
    "coerce_config",
    "coerce_sections",
    "data_sections",
    "get_source",
    "read_source",
    "register_source",
    "resolve_root",
    "source_config",
]
