"""The ``covid-chestxray-severity`` source: pneumonia severity scores of the covid-chestxray
collection (Cohen et al. 2020).

``annotations/covid-severity-scores.csv`` starts with ``##`` comment lines, then::

    filename,geographic_mean,opacity_mean
    01E392EE-69F9-4E33-BFCE-E5C968654078.jpeg,6.0,4.0

Each score is the mean of three radiologists: geographic extent (0-4 per lung, 0-8 in all)
and opacity (0-3 per lung, 0-6 in all). Rows are joined with metadata.csv by file name
(patient id, view, modality, through `read_metadata_rows`) and with the images folder.
Samples carry ``labels={"geographic_extent": x, "opacity": y}``. The scores file comes from the
``covid_chestxray_severity`` section of caaxr_tf/configs/data.yaml, the collection's layout from its
``covid_chestxray`` section (`SeveritySourceConfig` holds both).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from caaxr_tf.data.formats import check_regular_file
from caaxr_tf.data.records import InputError, ReadResult, Sample, SchemaError
from caaxr_tf.data.sources import coerce_sections, register_source, resolve_root
from caaxr_tf.data.sources.covid_chestxray import (
    CovidChestxrayConfig,
    MetadataRow,
    collection_paths,
    read_metadata_rows,
)

SOURCE = "covid-chestxray-severity"
SCORES_FILE = "annotations/covid-severity-scores.csv"
COMMENT_PREFIX = "##"
FILENAME_COLUMN = "filename"


@dataclass(frozen=True)
class SeverityTarget:
    """One regression target: its label name, its column in the scores file and its range."""

    name: str
    column: str
    low: float
    high: float


TARGETS: tuple[SeverityTarget, ...] = (
    SeverityTarget("geographic_extent", "geographic_mean", 0.0, 8.0),
    SeverityTarget("opacity", "opacity_mean", 0.0, 6.0),
)
TARGET_NAMES: tuple[str, ...] = tuple(target.name for target in TARGETS)
TARGET_RANGES: dict[str, tuple[float, float]] = {t.name: (t.low, t.high) for t in TARGETS}
SCORE_COLUMNS: tuple[str, ...] = (FILENAME_COLUMN, *(target.column for target in TARGETS))


@dataclass(frozen=True)
class SeverityConfig:
    """The ``covid_chestxray_severity`` section of caaxr_tf/configs/data.yaml.

    Attributes:
        scores: the scores file, relative to the collection folder (``covid_chestxray.root``).
    """

    scores: str = SCORES_FILE


@dataclass(frozen=True)
class SeveritySourceConfig:
    """What the ``covid-chestxray-severity`` source reads: its own section and the collection's."""

    covid_chestxray_severity: SeverityConfig = field(default_factory=SeverityConfig)
    covid_chestxray: CovidChestxrayConfig = field(default_factory=CovidChestxrayConfig)


def _decode(raw: bytes) -> str:
    """UTF-8 (a byte-order mark dropped), else Latin-1, which decodes any bytes."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_score_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, str]]]:
    """The data rows of a scores file as ``(line number, {column: stripped text})``.

    Leading lines starting with ``##`` and blank lines are skipped; the next line is the
    header. Line numbers count every physical line from 1, comments included.

    Raises:
        SchemaError: the file is missing or unreadable, holds no header line (empty, blank or
            comments only), or its header lacks ``SCORE_COLUMNS`` (the message lists the
            columns it has).
    """
    path = str(path)
    try:
        if os.path.lexists(path):  # a missing file is reported below, as before
            check_regular_file(path, "file")  # before opening: a FIFO would block
    except InputError as error:
        raise SchemaError(path, error.field, error.reason) from None
    try:
        with open(path, "rb") as handle:
            text = _decode(handle.read())
    except FileNotFoundError as error:
        raise SchemaError(path, "file", "not found") from error
    except OSError as error:
        raise SchemaError(path, "file", f"cannot be read ({error.strerror or error})") from error
    lines = text.splitlines()
    skipped = 0
    while skipped < len(lines) and (not lines[skipped].strip() or lines[skipped].lstrip().startswith(COMMENT_PREFIX)):
        skipped += 1
    if skipped == len(lines):
        raise SchemaError(
            path,
            "header",
            f"no header line ({len(lines)} blank or comment line(s)); expected columns {list(SCORE_COLUMNS)}",
        )
    reader = csv.reader(io.StringIO("\n".join(lines[skipped:])))
    header = [name.strip() for name in next(reader)]
    missing = [name for name in SCORE_COLUMNS if name not in header]
    if missing:
        raise SchemaError(
            path,
            ", ".join(missing),
            f"required column(s) missing after {skipped} comment line(s); found {header}",
        )
    rows = []
    for offset, cells in enumerate(reader):
        if not any(cell.strip() for cell in cells):
            continue  # blank line
        cells = cells + [""] * (len(header) - len(cells))
        line = skipped + 2 + offset
        rows.append((line, {name: cells[i].strip() for i, name in enumerate(header)}))
    return rows


def _parse_score(text: str, target: SeverityTarget) -> tuple[float | None, str]:
    """(value, "") for a valid score, else (None, reason)."""
    try:
        value = float(text)
    except ValueError:
        return None, f"not a number: {text!r}"
    if not math.isfinite(value):
        return None, f"not a finite number: {text!r}"
    if not target.low <= value <= target.high:
        return None, f"{_shortest(value)} is outside {target.low:g}..{target.high:g}"
    return value, ""


def _shortest(value: float) -> str:
    """The shortest text that reads back as ``value`` (``repr``), without a trailing ``.0``:
    8.0000001 stays 8.0000001 (``:g`` would print 8), 9.0 prints 9."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _metadata_by_filename(rows: Sequence[MetadataRow]) -> dict[str, MetadataRow]:
    """File name -> its first usable row, or its first row when none is usable."""
    chosen: dict[str, MetadataRow] = {}
    for entry in rows:
        current = chosen.get(entry.filename)
        if current is None or (current.sample is None and entry.sample is not None):
            chosen[entry.filename] = entry
    return chosen


@register_source(SOURCE, section=("covid_chestxray_severity", "covid_chestxray"), config=SeveritySourceConfig)
def read(data_root: str | os.PathLike, config: SeveritySourceConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """The scored frontal images of covid-chestxray, labels geographic_extent (0-8) and opacity (0-6)."""
    config = coerce_sections(SeveritySourceConfig, config)
    return read_severity_scores(resolve_root(data_root, config.covid_chestxray.root), config)


def read_severity_scores(
    root: str | os.PathLike, config: SeveritySourceConfig | Mapping[str, Any] | None = None
) -> ReadResult:
    """Read the scored images of the collection under ``root``.

    Args:
        root: the collection folder itself (metadata.csv, images/, annotations/).
        config: a `SeveritySourceConfig`, a mapping with its two sections, or None for the
            defaults.

    Returns:
        One sample per valid row, in file order: source ``covid-chestxray``, ``patient_id``
        from metadata.csv, ``labels`` ``{"geographic_extent": x, "opacity": y}``. Every other
        row is a ``Skipped`` entry naming the scores file and ``row <line>: <field>``: an empty
        or repeated file name, a score that is not a number or lies outside its range, a file
        name without a metadata row, or whose metadata row is unusable (no image file,
        another modality or view, no patient id).

    Raises:
        SchemaError: the scores file or metadata.csv is missing or lacks a required column.
    """
    config = coerce_sections(SeveritySourceConfig, config)
    collection = config.covid_chestxray
    scores_path = Path(root).resolve() / config.covid_chestxray_severity.scores
    score_rows = read_score_rows(scores_path)
    metadata_path, images_dir = collection_paths(root, collection)
    metadata = _metadata_by_filename(read_metadata_rows(metadata_path, images_dir, collection))

    result = ReadResult()
    path = str(scores_path)
    first_line: dict[str, int] = {}
    for line, cells in score_rows:
        filename = cells[FILENAME_COLUMN]
        if not filename:
            result.skip(path, f"row {line}: {FILENAME_COLUMN}", "empty file name")
            continue
        if filename in first_line:
            result.skip(
                path,
                f"row {line}: {FILENAME_COLUMN}",
                f"duplicate file name {filename!r} (first at row {first_line[filename]})",
            )
            continue
        first_line[filename] = line
        labels: dict[str, float] = {}
        for target in TARGETS:
            value, problem = _parse_score(cells[target.column], target)
            if value is None:
                result.skip(path, f"row {line}: {target.column}", problem)
                break
            labels[target.name] = value
        else:
            entry = metadata.get(filename)
            if entry is None:
                reason = f"{filename!r} has no row in {metadata_path.name}"
                result.skip(path, f"row {line}: {FILENAME_COLUMN}", reason)
            elif entry.sample is None:
                reason = f"{metadata_path.name} row {entry.row}: {entry.field}: {entry.reason}"
                result.skip(path, f"row {line}: {FILENAME_COLUMN}", reason)
            else:
                result.samples.append(entry.sample.replace(labels=labels))
    return result


def severity_targets(samples: Sequence[Sample]) -> np.ndarray:
    """float64 [N, 2] scores (columns in ``TARGET_NAMES`` order)."""
    return np.array([[s.labels[name] for name in TARGET_NAMES] for s in samples], dtype=np.float64)


def patient_groups(samples: Sequence[Sample]) -> list[str]:
    """The patient id of every sample: the groups of the grouped splits."""
    return [s.patient_id for s in samples]
