"""The ``covid-chestxray`` source: the public COVID-19 image data collection (Cohen et al. 2020).

``metadata.csv`` has one row per image; rows with modality X-ray and a frontal view are kept.
The optional COCO file ``annotations/lung_bounding_boxes.json`` adds "Right Lung" /
"Left Lung" boxes. A broken box is reported and dropped; its image stays.
The optional ``row_filter`` keeps part of the collection by its metadata columns (``url``,
``location``, ...; see ``caaxr_tf.data.row_filter``); rows it drops are counted under
``excluded`` after the modality and view checks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from caaxr_tf.data.boxes import BoxError, parse_box
from caaxr_tf.data.formats import image_size
from caaxr_tf.data.records import Box, ReadResult, Sample, SchemaError, read_csv_table, resolve_inside
from caaxr_tf.data.row_filter import RowFilter
from caaxr_tf.data.sources import coerce_config, register_source, resolve_root

SOURCE = "covid-chestxray"
REQUIRED_COLUMNS = ("patientid", "finding", "view", "modality", "filename")
DEMOGRAPHIC_COLUMNS = ("sex", "age")  # optional; carried into the manifest (Sample.demographics)


def _cell(value) -> str:
    """A metadata cell as text; empty for a blank or NaN cell."""
    text = "" if value is None else str(value).strip()
    return "" if text.lower() in ("nan", "none") else text
EXCLUDED_MODALITY = "modality not X-ray"
EXCLUDED_VIEW = "non-frontal view"
_FINDING_SPLIT = re.compile(r"[,/]")


ROW_FILTER_NAME = "covid_chestxray.row_filter"


def _no_row_filter() -> dict[str, Any]:
    return {"include": {}, "exclude": {}, "match": "substring"}


@dataclass(frozen=True)
class CovidChestxrayConfig:
    """The ``covid_chestxray`` section of caaxr_tf/configs/data.yaml (also read by the
    ``covid-chestxray-severity`` and ``covid-chestxray-lungs`` sources).

    Attributes:
        root: the collection folder, relative to the data root unless absolute.
        metadata, images: metadata.csv and the image folder, relative to ``root``.
        lung_boxes: the COCO lung boxes, relative to ``root``; null or "" for none.
        frontal_views: kept ``view`` values (case-insensitive).
        modality: the kept ``modality`` (case-insensitive).
        row_filter: keep part of the collection by its metadata columns (see
            ``caaxr_tf.data.row_filter``; checked when the config is loaded).
    """

    root: str = "."
    metadata: str = "metadata.csv"
    images: str = "images"
    lung_boxes: str | None = "annotations/lung_bounding_boxes.json"
    frontal_views: tuple[str, ...] = ("PA", "AP", "AP Supine", "AP semi erect")
    modality: str = "X-ray"
    row_filter: Any = field(default_factory=_no_row_filter)

    def __post_init__(self) -> None:
        self.rows()  # a malformed filter is an error when the config is loaded

    def rows(self) -> RowFilter:
        """The checked row filter."""
        return RowFilter.from_config(self.row_filter, name=ROW_FILTER_NAME)


def split_finding(value: str) -> tuple[str, ...]:
    """``"Pneumonia/Viral/COVID-19"`` or ``"COVID-19, ARDS"`` -> its stripped tokens."""
    return tuple(token.strip() for token in _FINDING_SPLIT.split(value) if token.strip())


def read_lung_boxes(
    path: str | os.PathLike, images_dir: str | os.PathLike, result: ReadResult
) -> dict[str, list[Box]]:
    """Read COCO lung boxes, keyed by image file name; bad boxes go to ``result.skipped``.

    Each box is checked against the size given for its image in the COCO file. Where that
    size disagrees with the image file itself, the image's boxes were drawn on another copy
    of it: the image is reported once (``image <id>: width/height``) and its boxes dropped.
    A ``file_name`` outside ``images_dir`` (absolute, or climbing out with ``..``) is
    reported and its boxes dropped. A missing file is reported and gives no boxes; a file
    that is not COCO JSON (or nested too deeply to parse) raises ``SchemaError``.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            coco = json.load(handle)
    except FileNotFoundError:
        result.skip(path, "file", "lung box annotations not found; images get no boxes")
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SchemaError(path, "json", f"cannot be read as JSON ({error})") from error
    except RecursionError:
        raise SchemaError(path, "json", "nested too deeply to be read as JSON") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(coco, dict) or not all(isinstance(coco.get(key), list) for key in keys):
        raise SchemaError(path, "json", f"expected a COCO object with lists {', '.join(keys)}")

    entries = [entry for entry in coco["images"] if isinstance(entry, dict)]
    categories = {
        entry.get("id"): str(entry.get("name", ""))
        for entry in coco["categories"]
        if isinstance(entry, dict)
    }
    images: dict[Any, tuple[str, tuple[int, int] | None]] = {}
    for entry in entries:
        image_id, file_name = entry.get("id"), entry.get("file_name")
        if not file_name:
            result.skip(path, f"image {image_id}: file_name", "missing")
            continue
        try:
            image_path = resolve_inside(images_dir, str(file_name))
        except ValueError as error:
            result.skip(path, f"image {image_id}: file_name", f"{error}; its boxes are dropped")
            continue
        declared = (entry.get("height"), entry.get("width"))
        size = declared if all(isinstance(v, int) and v > 0 for v in declared) else None
        actual = image_size(image_path) if image_path.is_file() else None  # header only
        if size is not None and actual is not None and actual != size:
            result.skip(
                path,
                f"image {image_id}: width/height",
                f"boxes drawn on a {size[1]}x{size[0]} image but {file_name} is "
                f"{actual[1]}x{actual[0]}; its boxes are dropped",
            )
            continue
        images[image_id] = (str(file_name), size or actual)

    known_ids = {entry.get("id") for entry in entries}
    boxes: dict[str, list[Box]] = {}
    for annotation in coco["annotations"]:
        if not isinstance(annotation, dict):
            result.skip(path, "annotation ?", "not a JSON object")
            continue
        field = f"annotation {annotation.get('id')}"
        image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
        image = images.get(image_id)
        if image is None:
            if image_id not in known_ids:  # else: the image was reported above
                result.skip(path, f"{field}: image_id", f"unknown image id {image_id!r}")
            continue
        category = categories.get(category_id)
        if not category:
            result.skip(path, f"{field}: category_id", f"unknown category {category_id!r}")
            continue
        bbox = annotation.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            reason = f"expected [x, y, width, height], found {bbox!r}"
            result.skip(path, f"{field}: bbox", reason)
            continue
        try:
            coords = list(zip(("x", "y", "width", "height"), bbox))
            box = parse_box(coords, "xywh", image[1], category)
        except BoxError as error:
            result.skip(path, f"{field}: bbox", str(error))
            continue
        boxes.setdefault(image[0], []).append(box)
    return boxes


@dataclass(frozen=True)
class MetadataRow:
    """One row of metadata.csv and what the reader makes of it.

    ``sample`` is the frontal X-ray of a usable row (without lung boxes); for a row left out it
    is ``None`` and ``field``/``reason`` say why. ``excluded`` marks rows left out on purpose
    (another modality, a lateral view) rather than bad input.
    """

    row: int  # line of metadata.csv, header = 1
    filename: str
    sample: Sample | None
    field: str = ""
    reason: str = ""
    excluded: bool = False


def collection_paths(root: str | os.PathLike, config: CovidChestxrayConfig) -> tuple[Path, Path]:
    """(metadata.csv, images folder) of the collection under ``root``."""
    root = Path(root).resolve()
    return root / config.metadata, root / config.images


def read_metadata_rows(
    metadata_path: str | os.PathLike, images_dir: str | os.PathLike, config: CovidChestxrayConfig
) -> list[MetadataRow]:
    """Every row of metadata.csv, in file order, checked as `read_covid_chestxray` checks it
    (``frontal_views``, ``modality``, ``row_filter`` of ``config``). Duplicate file names are
    not resolved here (every row is returned).

    Raises:
        SchemaError: the file is missing or lacks a required column (or one named by the row filter).
    """
    frontal = {str(view).strip().lower() for view in config.frontal_views}
    modality = config.modality.strip().lower()
    images_dir = Path(images_dir)
    row_filter = config.rows()
    table = read_csv_table(metadata_path, REQUIRED_COLUMNS)
    row_filter.check_columns(str(metadata_path), table.columns)
    optional = {name: [_cell(v) for v in table[name].tolist()] if name in table.columns else [""] * len(table)
                for name in DEMOGRAPHIC_COLUMNS}

    def check(index: int, patient: str, finding: str, view: str, row_modality: str, filename: str) -> MetadataRow:
        row, filename = index + 2, filename.strip()
        if row_modality.strip().lower() != modality:
            return MetadataRow(row, filename, None, "modality", EXCLUDED_MODALITY, excluded=True)
        if view.strip().lower() not in frontal:
            return MetadataRow(row, filename, None, "view", EXCLUDED_VIEW, excluded=True)
        if row_filter.active and (dropped := row_filter.reason_to_drop(table.iloc[index])) is not None:
            return MetadataRow(row, filename, None, "row_filter", dropped, excluded=True)
        if not filename:
            return MetadataRow(row, filename, None, "filename", "empty file name")
        try:
            image_path = resolve_inside(images_dir, filename)
        except ValueError as error:
            return MetadataRow(row, filename, None, "filename", str(error))
        filename = image_path.relative_to(images_dir).as_posix()  # "a/../b.png" is b.png
        if not image_path.is_file():
            return MetadataRow(row, filename, None, "filename", f"image file not found: {filename}")
        if not patient.strip():
            return MetadataRow(row, filename, None, "patientid", "empty patient id")
        findings = split_finding(finding)
        sample = Sample(
            image_id=filename,
            patient_id=patient.strip(),
            source=SOURCE,
            path=str(image_path),
            labels={"COVID-19": 1.0 if any(token.lower() == "covid-19" for token in findings) else 0.0},
            findings=findings,
            view=view.strip().lower(),
            demographics={name: optional[name][index] for name in DEMOGRAPHIC_COLUMNS},
        )
        return MetadataRow(row, filename, sample)

    columns = [table[name].tolist() for name in REQUIRED_COLUMNS]
    return [check(index, *values) for index, values in enumerate(zip(*columns))]


@register_source(SOURCE, section="covid_chestxray", config=CovidChestxrayConfig)
def read(data_root: str | os.PathLike, config: CovidChestxrayConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """Frontal X-rays of the covid-chestxray collection with their findings and COCO lung boxes."""
    config = coerce_config(CovidChestxrayConfig, config, "covid_chestxray")
    return read_covid_chestxray(resolve_root(data_root, config.root), config)


def read_covid_chestxray(
    root: str | os.PathLike, config: CovidChestxrayConfig | Mapping[str, Any] | None = None
) -> ReadResult:
    """Read the frontal X-rays of the collection under ``root``.

    Args:
        root: the collection folder itself (``config.root`` is not used here); ``config``
            paths (``metadata``, ``images``, ``lung_boxes``) are relative to it.
        config: a `CovidChestxrayConfig`, a mapping of its fields (missing keys take the
            defaults) or None for the defaults.

    Raises:
        SchemaError: metadata.csv is missing or lacks a required column (or a column named
            by ``row_filter``), or the lung box file is not COCO JSON.
        ValueError: ``row_filter`` is malformed; ConfigError: another bad setting.
    """
    config = coerce_config(CovidChestxrayConfig, config, "covid_chestxray")
    metadata_path, images_dir = collection_paths(root, config)
    rows = read_metadata_rows(metadata_path, images_dir, config)
    result = ReadResult()
    lung_boxes: dict[str, list[Box]] = {}
    if config.lung_boxes:
        lung_boxes = read_lung_boxes(Path(root).resolve() / config.lung_boxes, images_dir, result)

    first_row: dict[str, tuple[int, str]] = {}
    for entry in rows:
        if entry.sample is None:
            if entry.excluded:
                result.exclude(entry.reason)
            else:
                result.skip(str(metadata_path), f"row {entry.row}: {entry.field}", entry.reason)
            continue
        filename, patient = entry.filename, entry.sample.patient_id
        if filename in first_row:
            # The collection repeats some files under a second patient id.
            first, first_patient = first_row[filename]
            result.skip(
                str(metadata_path),
                f"row {entry.row}: filename",
                f"duplicate file name {filename!r} (first at row {first}, patient {first_patient}; "
                f"this row: patient {patient})",
            )
            continue
        first_row[filename] = (entry.row, patient)
        result.samples.append(entry.sample.replace(boxes=tuple(lung_boxes.get(filename, ()))))
    return result
