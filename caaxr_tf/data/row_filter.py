"""Keep part of a metadata table by the values of its columns (``row_filter`` in caaxr_tf/configs/data.yaml).

    row_filter:
      include: {url: [eurorad.org]}             # keep a row only if every listed column matches
      exclude: {location: [Italy, Germany]}     # drop a row if any listed column matches
      match: substring                          # or "exact"

A cell matches a column's list when it matches one of its patterns: ``substring`` (default)
means the pattern occurs in the cell, ``exact`` that the cell equals it; both compare
case-insensitively with surrounding spaces stripped. ``include`` is checked first, then
``exclude``. An empty or absent filter keeps every row.

The configuration is checked strictly (unknown keys, non-list patterns, empty substring
patterns: ``ValueError`` naming the key); a column the table lacks is a ``SchemaError`` naming
the file and the columns it has, raised before any row is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from caaxr_tf.data.records import SchemaError

MATCH_MODES = ("substring", "exact")
KEYS = ("include", "exclude", "match")


def _normalise(value: Any) -> str:
    return str(value).strip().lower()


def _patterns(where: str, column: Any, patterns: Any, mode: str) -> tuple[str, ...]:
    if not isinstance(column, str) or not column.strip():
        raise ValueError(f"{where}: column names must be non-empty strings, got {column!r}")
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise ValueError(
            f"{where}.{column}: expected a non-empty list of values, got {patterns!r} "
            f"(write [{patterns!r}] for one value)"
        )
    cleaned = []
    for pattern in patterns:
        if not isinstance(pattern, (str, int, float)) or isinstance(pattern, bool):
            raise ValueError(f"{where}.{column}: values must be strings, got {pattern!r}")
        text = _normalise(pattern)
        if mode == "substring" and not text:
            raise ValueError(
                f"{where}.{column}: an empty substring matches every row; use match: exact "
                "to select empty cells"
            )
        cleaned.append(text)
    return tuple(cleaned)


@dataclass(frozen=True)
class RowFilter:
    """A checked ``row_filter`` (see module doc); ``RowFilter()`` keeps every row."""

    include: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    match: str = "substring"
    name: str = "row_filter"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, name: str = "row_filter") -> "RowFilter":
        """Check a ``row_filter`` mapping; ``name`` is its config key, used in error messages."""
        if config is None:
            return cls(name=name)
        if not isinstance(config, Mapping):
            raise ValueError(f"{name}: expected a mapping with {', '.join(KEYS)}, got {config!r}")
        unknown = sorted(set(config) - set(KEYS))
        if unknown:
            raise ValueError(f"{name}: unknown key(s) {unknown}; expected {', '.join(KEYS)}")
        mode = config.get("match") or "substring"
        if mode not in MATCH_MODES:
            raise ValueError(f"{name}.match: expected one of {MATCH_MODES}, got {mode!r}")
        parts = {}
        for part in ("include", "exclude"):
            body = config.get(part) or {}
            if not isinstance(body, Mapping):
                raise ValueError(f"{name}.{part}: expected {{column: [values]}}, got {body!r}")
            where = f"{name}.{part}"
            parts[part] = {col.strip(): _patterns(where, col, pats, mode) for col, pats in body.items()}
        return cls(include=parts["include"], exclude=parts["exclude"], match=mode, name=name)

    @property
    def active(self) -> bool:
        return bool(self.include or self.exclude)

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([*self.include, *self.exclude]))

    def check_columns(self, path: str, columns) -> None:
        """``SchemaError`` for a filter column that the file at ``path`` lacks."""
        present = list(columns)
        for part, body in (("include", self.include), ("exclude", self.exclude)):
            missing = [column for column in body if column not in present]
            if missing:
                raise SchemaError(
                    str(path),
                    f"{self.name}.{part}.{missing[0]}",
                    f"unknown column(s) {missing}; the file has columns {present}",
                )

    def _matches(self, cell: Any, patterns: tuple[str, ...]) -> bool:
        text = _normalise(cell)
        if self.match == "exact":
            return text in patterns
        return any(pattern in text for pattern in patterns)

    def reason_to_drop(self, row: Mapping[str, Any]) -> str | None:
        """Why ``row`` is filtered out (the "excluded" reason), or None to keep it."""
        for column, patterns in self.include.items():
            if not self._matches(row[column], patterns):
                return f"{self.name}: {column} matches no include value {list(patterns)}"
        for column, patterns in self.exclude.items():
            if self._matches(row[column], patterns):
                return f"{self.name}: {column} matches an exclude value {list(patterns)}"
        return None
