"""A protocol folder's summary.json, typed, and the one way a protocol folder is located.

`locate_protocol` finds ``TFRECORDS/<protocol>`` or a protocol folder given itself (training,
evaluation, explanation and CV all use it); `ProtocolSummary` is summary.json read once, with
the fields the readers use as attributes (``raw`` keeps the whole mapping for the writer's own
fields and the functions that take the dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from caaxr_tf.data.schema import SUMMARY_FILE, read_summary_file


def locate_protocol(path: str | Path, protocol: str | None = None) -> Path:
    """The protocol folder (resolved): ``path/<protocol>`` when it holds a summary.json, else
    ``path`` itself when it does; ``FileNotFoundError`` naming what was tried. (Whether the
    folder holds ``protocol`` is for the caller to check: an external protocol folder may hold
    another protocol with the same classes.)"""
    path = Path(path)
    candidates = ([path / protocol] if protocol else []) + [path]
    for candidate in candidates:
        if (candidate / SUMMARY_FILE).exists():
            return candidate.resolve()
    tried = ", ".join(str(candidate / SUMMARY_FILE) for candidate in reversed(candidates))
    raise FileNotFoundError(f"no protocol folder at {path}: none of {tried} exists")


@dataclass(frozen=True)
class ProtocolSummary:
    """A protocol folder's summary.json (see docs: written by ``caaxr_tf.data.tfrecords``)."""

    path: Path
    protocol: str
    task: str
    classes: list[str]
    folds: int
    target_names: list[str] = field(default_factory=list)
    target_ranges: dict[str, list[float]] = field(default_factory=dict)
    subsets: dict[str, Any] = field(default_factory=dict)
    split_scheme: str | None = None
    fingerprint: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def read(cls, protocol_dir: str | Path) -> "ProtocolSummary":
        """summary.json of ``protocol_dir`` (errors name the file)."""
        protocol_dir = Path(protocol_dir)
        path = protocol_dir / SUMMARY_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: {protocol_dir} is not a protocol folder written by tools/make_tfrecords.py")
        return cls.from_mapping(protocol_dir, read_summary_file(path))

    @classmethod
    def from_mapping(cls, protocol_dir: str | Path, summary: Mapping[str, Any]) -> "ProtocolSummary":
        return cls(
            path=Path(protocol_dir),
            protocol=str(summary.get("protocol") or ""),
            task=str(summary.get("task") or ""),
            classes=[str(c) for c in summary.get("classes") or []],
            folds=int(summary.get("folds") or 1),
            target_names=[str(t) for t in summary.get("target_names") or []],
            target_ranges={str(k): [float(b) for b in v] for k, v in (summary.get("target_ranges") or {}).items()},
            subsets=dict(summary.get("subsets") or {}),
            split_scheme=summary.get("split_scheme"),
            fingerprint=str(summary.get("fingerprint") or ""),
            raw=dict(summary),
        )

    @classmethod
    def locate(cls, path: str | Path, protocol: str | None = None) -> "ProtocolSummary":
        """`locate_protocol`, then its summary.json."""
        return cls.read(locate_protocol(path, protocol))
