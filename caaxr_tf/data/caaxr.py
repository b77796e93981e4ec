"""CAAXR reader: BIMCV-COVID19+ frontal images joined with the CAAXR annotations.

``caaxr/Study-Level_Annotations.csv`` lists the annotated images (the COVID-positive pool) and
their study-level findings; ``caaxr/BoundingBox.csv`` holds one abnormality box per row in
pixel coordinates of the BIMCV PNG. Column names and the box format come from the ``caaxr``
section of configs/data.yaml.

A CSV without a configured column raises ``SchemaError`` before anything is read. Problems in
one row are reported as ``Skipped(csv, "row N: <column>", reason)``; a bad box drops that box
only, never its image. Row numbers count the header as row 1, as a spreadsheet shows them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from caaxr_tf.config import deep_merge, load_config
from caaxr_tf.data.bimcv import scan_bimcv
from caaxr_tf.data.records import Box, ReadResult, read_csv_table

# Annotations made on a resized copy can overrun the far edge by a fraction of a pixel
# (rounding); such boxes are clipped to the image, larger overruns are reported.
EDGE_TOLERANCE_PX = 1.0
EXCLUDED_UNANNOTATED = "not in CAAXR study-level annotations"


class BoxError(ValueError):
    """One bad box value: ``label`` names the coordinate as the caller spelled it."""

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.label = label
        self.reason = reason


def _number(label: str, value: Any) -> float:
    if value is None:
        raise BoxError(label, "is null")
    if isinstance(value, bool):
        raise BoxError(label, f"not a number ({value!r})")
    if isinstance(value, str):
        if not value.strip():
            raise BoxError(label, "is empty")
        try:
            value = float(value)
        except ValueError:
            raise BoxError(label, f"not a number ({value.strip()!r})") from None
    if not isinstance(value, (int, float)):
        raise BoxError(label, f"not a number ({value!r})")
    if math.isnan(value):
        raise BoxError(label, "is NaN")
    if math.isinf(value):
        raise BoxError(label, f"not finite ({value})")
    return float(value)


def parse_box(
    values: Sequence[tuple[str, Any]],
    box_format: str = "xywh",
    image_size: tuple[int, int] | None = None,
    finding: str = "abnormality",
) -> Box:
    """Check one box and return it in pixel ``xyxy`` form.

    Args:
        values: four ``(label, raw value)`` pairs: x, y, then width, height (``xywh``) or
            x_max, y_max (``xyxy``). Labels only name the values in errors.
        box_format: ``xywh`` or ``xyxy``.
        image_size: ``(height, width)`` when known; the box must then lie inside the image
            (an overrun below ``EDGE_TOLERANCE_PX`` at the far edge is clipped).
        finding: stored on the box.

    Raises:
        BoxError: naming the first bad value (null/NaN/non-numeric, negative, empty box,
            outside the image).
    """
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    (x_label, x_raw), (y_label, y_raw), (a_label, a_raw), (b_label, b_raw) = values
    x, y = _number(x_label, x_raw), _number(y_label, y_raw)
    a, b = _number(a_label, a_raw), _number(b_label, b_raw)
    for label, value in ((x_label, x), (y_label, y), (a_label, a), (b_label, b)):
        if value < 0:
            raise BoxError(label, f"negative ({value:g})")
    if box_format == "xywh":
        if a <= 0:
            raise BoxError(a_label, f"box width must be > 0 (got {a:g})")
        if b <= 0:
            raise BoxError(b_label, f"box height must be > 0 (got {b:g})")
        xmax, ymax = x + a, y + b
    else:
        if a <= x:
            raise BoxError(a_label, f"must be greater than {x_label} ({a:g} <= {x:g})")
        if b <= y:
            raise BoxError(b_label, f"must be greater than {y_label} ({b:g} <= {y:g})")
        xmax, ymax = a, b
    if image_size is not None:
        height, width = image_size
        for start, end, limit, start_label, end_label, axis in (
            (x, xmax, width, x_label, a_label, "width"),
            (y, ymax, height, y_label, b_label, "height"),
        ):
            if start >= limit:
                raise BoxError(start_label, f"{start:g} is outside the image ({axis} {limit})")
            if end > limit + EDGE_TOLERANCE_PX:
                reason = f"box ends at {end:g}, outside the image ({axis} {limit})"
                raise BoxError(end_label, reason)
        xmax, ymax = min(xmax, width), min(ymax, height)
    return Box(x, y, xmax, ymax, finding)


def _image_id(raw: str) -> str:
    image_id = raw.strip()
    if image_id.lower().endswith(".png"):
        image_id = image_id[: -len(".png")]
    return image_id


def _resolve(data_root: Path, path: str) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else data_root / path


def split_findings(value: str, separator: str, no_finding: Sequence[str]) -> tuple[str, ...]:
    """Finding names of one study-level cell, stripped and deduplicated, without "No finding"."""
    ignore = {str(name).strip().lower() for name in no_finding}
    findings: list[str] = []
    for token in value.split(separator):
        token = token.strip()
        if token and token.lower() not in ignore and token not in findings:
            findings.append(token)
    return tuple(findings)


def read_caaxr(data_root: str | os.PathLike, config: Mapping[str, Any] | None = None) -> ReadResult:
    """Read the CAAXR pool: BIMCV frontal images listed in the study-level CSV, with boxes.

    Args:
        data_root: the folder holding ``bimcv/`` and ``caaxr/`` (paths from the config are
            relative to it unless absolute).
        config: the whole data config (its ``bimcv`` and ``caaxr`` sections are used;
            defaults from configs/data.yaml fill missing keys).

    Raises:
        SchemaError: a CSV is missing or lacks a configured column.
    """
    config = deep_merge(load_config("data"), config or {})
    section = config["caaxr"]
    data_root = Path(data_root).resolve()
    caaxr_root = _resolve(data_root, section["root"])
    box_path = str(caaxr_root / section["bounding_boxes"])
    study_path = str(caaxr_root / section["study_level"])

    box_format = str(section.get("box_format", "xywh")).lower()
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"caaxr.box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    box_columns = dict(section["box_columns"])
    size_keys = ("width", "height") if box_format == "xywh" else ("x_max", "y_max")
    coord_columns = [box_columns["x"], box_columns["y"]] + [
        box_columns.get(key, key) for key in size_keys
    ]
    box_id_column, finding_column = box_columns["image_id"], box_columns["finding"]
    study_columns = section["study_columns"]
    study_id_column, findings_column = study_columns["image_id"], study_columns["findings"]

    # Both schemas are checked before the (slow) BIMCV walk.
    studies = read_csv_table(study_path, [study_id_column, findings_column])
    boxes_table = read_csv_table(box_path, [box_id_column, finding_column, *coord_columns])

    scan = scan_bimcv(_resolve(data_root, config["bimcv"]["root"]), config["bimcv"])
    result = ReadResult(skipped=list(scan.result.skipped), excluded=dict(scan.result.excluded))
    usable = {sample.image_id: sample for sample in scan.result.samples}
    # Each problem is reported once: rows of an image skipped by the BIMCV reader, or whose
    # study-level row was reported, are dropped without a second report.
    reported = scan.found - set(usable) - scan.non_frontal

    def unusable_reason(image_id: str) -> str:
        if image_id in scan.non_frontal:
            return f"image {image_id!r} is a non-frontal view in the BIMCV tree"
        return f"image {image_id!r} not found in the BIMCV tree"

    separator = str(section.get("findings_separator", ";"))
    no_finding = section.get("no_finding", ["no finding", "normal"])
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
                reason = f"image {image_id!r} is not listed in {section['study_level']}"
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
