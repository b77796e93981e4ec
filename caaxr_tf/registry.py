"""One registry mechanism for everything looked up by name: tasks, models, sources, synthetic layouts.

    WIDGETS = Registry("widget", package="my_pkg.widgets")

    @WIDGETS.register("round")          # in my_pkg/widgets/round.py
    class Round: ...

    WIDGETS.get("round")                # imports the package's modules on first use
    WIDGETS.names()                     # ["round", ...]

A registry maps names to values (classes, functions, specs). Its built-in entries are the
modules of one package: adding one means adding a module there, no list to edit. The modules
are discovered with ``pkgutil`` and imported lazily, on the first lookup. With
``module_entry`` (a module's name -> the entry it registers, or None for a module that is not
an entry) the registry knows its built-in names without importing anything, and a lookup
imports only the module of that name; without it, the first lookup imports every module of
the package.

This module imports nothing from caaxr_tf, so any layer can define a registry.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def _origin(value: object) -> str:
    """Where a registered value comes from, for the duplicate-name error."""
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    return module or repr(value)


class Registry(Generic[T]):
    """Name -> value, with lazy discovery of a package's modules (see the module docstring).

    Args:
        kind: what an entry is, for messages (``"task"``: ``unknown task 'x'; known tasks: ...``).
        package: dotted name of the package whose modules register the built-in entries.
        module_entry: a module's name (last component) -> the entry it registers, or None when
            the module registers nothing; gives the built-in names without importing.
        error: the exception class of an unknown name (a ``ValueError`` subclass by default).
        plural: ``kind`` in the plural (default ``kind + "s"``).
        origin: the text naming where a registered value comes from (duplicate-name error).
    """

    def __init__(self, kind: str, *, package: str | None = None,
                 module_entry: Callable[[str], str | None] | None = None,
                 error: type[Exception] = ValueError, plural: str | None = None,
                 origin: Callable[[T], str] = _origin):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.package = package
        self.module_entry = module_entry
        self.error = error
        self.origin = origin
        self._entries: dict[str, T] = {}
        self._discovered = False

    # ------------------------------------------------------------------ registering

    def register(self, name: str, value: T | None = None) -> Callable[[T], T] | T:
        """Register ``value`` as ``name`` (returns it), or, without ``value``, a decorator that
        does. A name already registered with another value is refused (``ValueError``);
        registering the same value again (a module imported twice) is harmless."""
        if value is None:
            return lambda decorated: self.register(name, decorated)
        existing = self._entries.get(name)
        if existing is not None and existing is not value and existing != value:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self.origin(existing)}")
        self._entries[name] = value
        return value

    # ------------------------------------------------------------------ discovery

    def builtin_modules(self) -> dict[str, str]:
        """``{entry name: module}`` of the package's modules (``module_entry`` registries), or
        ``{module: module}`` of all of them; imports only the package itself."""
        if self.package is None:
            return {}
        package = importlib.import_module(self.package)
        found: dict[str, str] = {}
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            key = self.module_entry(info.name) if self.module_entry is not None else info.name
            if key is not None:
                found[key] = f"{self.package}.{info.name}"
        return found

    def discover(self) -> None:
        """Import every built-in module of the package (once)."""
        if self._discovered:
            return
        self._discovered = True
        try:
            for module in self.builtin_modules().values():
                importlib.import_module(module)
        except BaseException:
            self._discovered = False
            raise

    def _load(self, name: str) -> None:
        if name in self._entries:
            return
        if self.module_entry is not None:
            module = self.builtin_modules().get(name)
            if module is not None:
                importlib.import_module(module)
                return
        self.discover()

    # ------------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        """Every name, sorted: built-in and registered (imports nothing with ``module_entry``)."""
        if self.module_entry is not None:
            return sorted(set(self.builtin_modules()) | set(self._entries))
        self.discover()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The value of ``name``; ``error`` naming the known ones (and the closest) otherwise."""
        name = str(name)
        self._load(name)
        try:
            return self._entries[name]
        except KeyError:
            raise self.error(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; known {self.plural}: {', '.join(known)}"

    def items(self) -> list[tuple[str, T]]:
        """Every ``(name, value)``, sorted by name (imports every built-in module)."""
        self.discover()
        return sorted(self._entries.items())

    def values(self) -> list[T]:
        return [value for _, value in self.items()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, package={self.package!r})"


__all__ = ["Registry"]
