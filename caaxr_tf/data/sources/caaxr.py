"""The ``caaxr`` source: BIMCV-COVID19+ frontal images joined with the CAAXR annotations.

``caaxr/Study-Level_Annotations.csv`` lists the annotated images (the COVID-positive pool) and
their study-level findings; ``caaxr/BoundingBox.csv`` holds one abnormality box per row in
pixel coordinates of the BIMCV PNG. The BIMCV tree is scanned by ``caaxr_tf.data.bimcv``. Column
names and the box format come from the ``caaxr`` section of caaxr_tf/configs/data.yaml, the BIMCV
settings from its ``bimcv`` section (`CaaxrSourceConfig` holds both).

A CSV without a configured column raises ``SchemaError`` before anything is read. Problems in
one row are reported as ``Skipped(csv, "row N: <column>", reason)``; a bad box drops that box
only, never its image. Row numbers count the header as row 1, as a spreadsheet shows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from caaxr_tf.data.bimcv import BimcvConfig, scan_bimcv
from caaxr_tf.data.boxes import BoxError, parse_box
from caaxr_tf.data.records import Box, ReadResult, read_csv_table
from caaxr_tf.data.sources import coerce_sections, register_source, resolve_root

SOURCE = "caaxr"
EXCLUDED_UNANNOTATED = "not in CAAXR study-level annotations"


@dataclass(frozen=True)
class BoxColumns:
    """Column names in BoundingBox.csv; ``image_id`` is the BIMCV file stem (".png" is stripped).
    ``width``/``height`` are read with ``box_format: xywh``, ``x_max``/``y_max`` with ``xyxy``."""

    image_id: str = "image_id"
    finding: str = "finding"
    x: str = "x"
    y: str = "y"
    width: str = "width"
    height: str = "height"
    x_max: str = "x_max"
    y_max: str = "y_max"


@dataclass(frozen=True)
class StudyColumns:
    """Column names in Study-Level_Annotations.csv."""

    image_id: str = "image_id"
    findings: str = "findings"


@dataclass(frozen=True)
class CaaxrConfig:
    """The ``caaxr`` section of caaxr_tf/configs/data.yaml.

    Attributes:
        root: the folder of the two CSVs, relative to the data root unless absolute.
        bounding_boxes, study_level: the CSV file names inside ``root``.
        box_columns, study_columns: their column names.
        box_format: ``xywh`` (x, y, width, height) or ``xyxy`` (x, y, x_max, y_max).
        findings_separator: separates the findings of one study-level cell.
        no_finding: study-level values that mean "no abnormality" (case-insensitive).
    """

    root: str = "caaxr"
    bounding_boxes: str = "BoundingBox.csv"
    study_level: str = "Study-Level_Annotations.csv"
    box_columns: BoxColumns = field(default_factory=BoxColumns)
    box_format: Literal["xywh", "xyxy"] = "xywh"
    study_columns: StudyColumns = field(default_factory=StudyColumns)
    findings_separator: str = ";"
    no_finding: tuple[str, ...] = ("no finding", "normal")


@dataclass(frozen=True)
class CaaxrSourceConfig:
    """What the ``caaxr`` source reads: the ``caaxr`` and ``bimcv`` sections of caaxr_tf/configs/data.yaml."""

    caaxr: CaaxrConfig = field(default_factory=CaaxrConfig)
    bimcv: BimcvConfig = field(default_factory=BimcvConfig)


def _image_id(raw: str) -> str:
    image_id = raw.strip()
    if image_id.lower().endswith(".png"):
        image_id = image_id[: -len(".png")]
    return image_id


def split_findings(value: str, separator: str, no_finding: Sequence[str]) -> tuple[str, ...]:
    """Finding names of one study-level cell, stripped and deduplicated, without "No finding"."""
    ignore = {str(name).strip().lower() for name in no_finding}
    findings: list[str] = []
    for token in value.split(separator):
        token = token.strip()
        if token and token.lower() not in ignore and token not in findings:
            findings.append(token)
    return tuple(findings)


@register_source(SOURCE, section=("caaxr", "bimcv"), config=CaaxrSourceConfig)
def read(data_root: str | os.PathLike, config: CaaxrSourceConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """BIMCV-COVID19+ frontal images listed in the CAAXR study-level CSV, with their boxes."""
    return read_caaxr(data_root, config)


def read_caaxr(data_root: str | os.PathLike, config: CaaxrSourceConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """Read the CAAXR pool: BIMCV frontal images listed in the study-level CSV, with boxes.

    Args:
        data_root: the folder holding ``bimcv/`` and ``caaxr/`` (the sections' ``root`` paths
            are relative to it unless absolute).
        config: a `CaaxrSourceConfig`, or a mapping with its ``caaxr``/``bimcv`` sections (e.g.
            a whole data config; missing keys take the defaults), or None for the defaults.

    Raises:
        SchemaError: a CSV is missing or lacks a configured column.
        ConfigError: a section has an unknown key or a value of the wrong type.
    """
    config = coerce_sections(CaaxrSourceConfig, config)
    section = config.caaxr
    data_root = Path(data_root).resolve()
    caaxr_root = resolve_root(data_root, section.root)
    box_path = str(caaxr_root / section.bounding_boxes)
    study_path = str(caaxr_root / section.study_level)

    box_format = section.box_format
    columns = section.box_columns
    size_columns = (columns.width, columns.height) if box_format == "xywh" else (columns.x_max, columns.y_max)
    coord_columns = [columns.x, columns.y, *size_columns]
    box_id_column, finding_column = columns.image_id, columns.finding
    study_id_column, findings_column = section.study_columns.image_id, section.study_columns.findings

    # Both schemas are checked before the (slow) BIMCV walk.
    studies = read_csv_table(study_path, [study_id_column, findings_column])
    boxes_table = read_csv_table(box_path, [box_id_column, finding_column, *coord_columns])

    scan = scan_bimcv(resolve_root(data_root, config.bimcv.root), config.bimcv)
    result = ReadResult(skipped=list(scan.result.skipped), excluded=dict(scan.result.excluded))
    usable = {sample.image_id: sample for sample in scan.result.samples}
    # Each problem is reported once: rows of an image skipped by the BIMCV reader, or whose
    # study-level row was reported, are dropped without a second report.
    reported = scan.found - set(usable) - scan.non_frontal

    def unusable_reason(image_id: str) -> str:
        if image_id in scan.non_frontal:
            return f"image {image_id!r} is a non-frontal view in the BIMCV tree"
        return f"image {image_id!r} not found in the BIMCV tree"

    separator = section.findings_separator
    no_finding = section.no_finding
    findings: dict[str, tuple[str, ...]] = {}
    first_row: dict[str, int] = {}
    for index, (raw_id, raw_findings) in enumerate(
        zip(studies[study_id_column], studies[findings_column])
    ):
        row = index + 2
        image_id = _image_id(raw_id)
        if not image_id:
            result.skip(study_path, f"row {row}: {study_id_column}", "empty image id")
            continue
        if image_id in first_row:
            result.skip(
                study_path,
                f"row {row}: {study_id_column}",
                f"duplicate study-level row for {image_id!r} (first at row {first_row[image_id]})",
            )
            continue
        first_row[image_id] = row
        if image_id not in usable:
            if image_id not in reported:
                result.skip(study_path, f"row {row}: {study_id_column}", unusable_reason(image_id))
                reported.add(image_id)
            continue
        findings[image_id] = split_findings(raw_findings, separator, no_finding)

    boxes: dict[str, list[Box]] = {image_id: [] for image_id in findings}
    coords = boxes_table[coord_columns].to_numpy()
    for index, (raw_id, raw_finding) in enumerate(
        zip(boxes_table[box_id_column], boxes_table[finding_column])
    ):
        row = index + 2
        image_id = _image_id(raw_id)
        if not image_id:
            result.skip(box_path, f"row {row}: {box_id_column}", "empty image id")
            continue
        if image_id not in findings:
            if image_id in reported:
                continue
            if image_id in usable:
                reason = f"image {image_id!r} is not listed in {section.study_level}"
            else:
                reason = unusable_reason(image_id)
            result.skip(box_path, f"row {row}: {box_id_column}", reason)
            continue
        try:
            box = parse_box(
                list(zip(coord_columns, coords[index])),
                box_format,
                scan.sizes.get(image_id),
                raw_finding.strip() or "abnormality",
            )
        except BoxError as error:
            result.skip(box_path, f"row {row}: {error.label}", error.reason)
            continue
        boxes[image_id].append(box)

    for sample in scan.result.samples:
        if sample.image_id not in findings:
            result.exclude(EXCLUDED_UNANNOTATED)
            continue
        result.samples.append(
            sample.replace(
                findings=findings[sample.image_id], boxes=tuple(boxes[sample.image_id])
            )
        )
    return result
