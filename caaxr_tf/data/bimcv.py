"""BIMCV-COVID19+ reader: MIDS tree of PNG images, each with a DICOM-JSON sidecar.

Layout (see docs/data_layouts.md)::

    <root>/.../sub-S00001/ses-E00001/mod-rx/sub-S00001_ses-E00001_run-1_bp-chest_vp-pa_dx.png
                                            sub-S00001_ses-E00001_run-1_bp-chest_vp-pa_dx.json

Every BIMCV image is COVID-19 positive. Only frontal views are kept; lateral ones are counted
in ``ReadResult.excluded``. A bad sidecar skips its image and names the sidecar and the tag.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from caaxr_tf.data.formats import image_size
from caaxr_tf.data.records import InputError, ReadResult, Sample, check_unique_ids
from caaxr_tf.data.sources import coerce_config

SOURCE = "bimcv"
IMAGE_GLOB = "**/sub-*/ses-*/mod-rx/*.png"

TAG_BITS_STORED = "00280101"
TAG_PRESENTATION_LUT_SHAPE = "20500020"
TAG_VIEW_POSITION = "00185101"
TAG_ROWS = "00280010"
TAG_COLUMNS = "00280011"
TAG_NAMES = {
    TAG_BITS_STORED: "BitsStored",
    TAG_PRESENTATION_LUT_SHAPE: "PresentationLUTShape",
    TAG_VIEW_POSITION: "ViewPosition",
    TAG_ROWS: "Rows",
    TAG_COLUMNS: "Columns",
}
EXCLUDED_VIEW = "non-frontal view"
# Descriptive tags carried into the manifest for per-slice scoring (caaxr score --slice-by); not
# used by the pipeline, so a value that cannot be read leaves the field empty instead of the image
# out. Names as the covid-chestxray manifest columns where they mean the same.
DEMOGRAPHIC_TAGS = {"00100040": "sex", "00101010": "age", "00080060": "modality", "00080070": "manufacturer"}


@dataclass(frozen=True)
class BimcvConfig:
    """The ``bimcv`` section of caaxr_tf/configs/data.yaml (read by the ``caaxr`` source).

    Attributes:
        root: the BIMCV tree, relative to the data root unless absolute.
        frontal_views: kept views: the ``vp-<view>`` entity of the file name, else the
            sidecar's ViewPosition (00185101); compared in lower case.
        require_sidecar: an image without a readable sidecar is skipped and reported.
    """

    root: str = "bimcv"
    frontal_views: tuple[str, ...] = ("ap", "pa")
    require_sidecar: bool = True


@dataclass(frozen=True)
class Sidecar:
    """The sidecar tags the pipeline uses; ``None`` where the tag is absent."""

    invert: bool = False
    bit_depth: int | None = None
    view: str | None = None
    rows: int | None = None
    columns: int | None = None
    demographics: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) in pixels when both Rows and Columns are given."""
        if self.rows is None or self.columns is None:
            return None
        return (self.rows, self.columns)


@dataclass
class BimcvScan:
    """A BIMCV read plus what the CAAXR reader needs to check its annotations."""

    result: ReadResult
    # image id -> (height, width) from the sidecar, for kept images whose sidecar gives both.
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Stem of every PNG found in the tree, kept or not, and of those left out as non-frontal.
    found: set[str] = field(default_factory=set)
    non_frontal: set[str] = field(default_factory=set)


def parse_entities(stem: str) -> dict[str, str]:
    """Split a MIDS file stem into its ``key-value`` entities; the last bare part is ``suffix``.

    ``sub-S1_ses-E2_run-1_bp-chest_vp-pa_dx`` -> ``{"sub": "S1", "ses": "E2", "run": "1",
    "bp": "chest", "vp": "pa", "suffix": "dx"}``.
    """
    entities: dict[str, str] = {}
    for part in stem.split("_"):
        key, sep, value = part.partition("-")
        if sep and key:
            entities.setdefault(key, value)
        elif part:
            entities["suffix"] = part
    return entities


def _tag_value(sidecar: Mapping[str, Any], tag: str) -> Any:
    """The value of ``tag`` in DICOM-JSON (``{"vr":..,"Value":[v]}``) or plain form, or None."""
    entry = sidecar.get(tag)
    if isinstance(entry, Mapping):
        values = entry.get("Value")
        if values is None:
            return None
        if not isinstance(values, list):
            return values
        if len(values) == 0:
            return None
        if len(values) > 1:
            raise ValueError(f"expected one value, found {len(values)}: {values!r}")
        return values[0]
    if isinstance(entry, list):
        if len(entry) != 1:
            raise ValueError(f"expected one value, found {len(entry)}: {entry!r}")
        return entry[0]
    return entry


def _as_int(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, found {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise ValueError(f"expected an integer, found {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{value} is outside {low}..{high}")
    return value


def dicom_age_years(value: str) -> str:
    """DICOM AgeString ``nnnD|W|M|Y`` in whole years as text (``"045Y"`` -> ``"45"``, ``"018M"`` ->
    ``"1"``); ``""`` when it is not one."""
    value = value.strip().upper()
    if len(value) != 4 or not value[:3].isdigit() or value[3] not in "DWMY":
        return ""
    days = {"D": 1, "W": 7, "M": 30.4375, "Y": 365.25}[value[3]]
    return str(int(int(value[:3]) * days // 365.25))


def read_demographics(data: Mapping[str, Any]) -> dict[str, str]:
    """Sex, age (years), modality and manufacturer of a sidecar, where present and readable."""
    found = {}
    for tag, name in DEMOGRAPHIC_TAGS.items():
        try:
            raw = _tag_value(data, tag)
        except ValueError:
            continue
        if isinstance(raw, Mapping):  # a PN-like object: not one of these tags' forms
            continue
        text = str(raw).strip() if raw is not None else ""
        text = dicom_age_years(text) if name == "age" and text else text
        if text:
            found[name] = text.upper() if name == "sex" else text
    return found


def read_sidecar(path: str | os.PathLike) -> Sidecar:
    """Read and check one sidecar; raises ``InputError(path, tag, reason)`` on bad input."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        # Opening a FIFO or a device would block or read without end.
        raise InputError(path, "file", "sidecar is not a regular file")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError as error:
        raise InputError(path, "file", "sidecar not found") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, "file", f"sidecar cannot be read ({error})") from error
    except json.JSONDecodeError as error:
        raise InputError(path, "json", f"invalid JSON ({error})") from error
    except RecursionError:
        raise InputError(path, "json", "nested too deeply to be read as JSON") from None
    if not isinstance(data, dict):
        raise InputError(path, "json", f"expected a JSON object, found {type(data).__name__}")

    def field_name(tag: str) -> str:
        return f"{tag} ({TAG_NAMES[tag]})"

    values: dict[str, Any] = {}
    for tag in TAG_NAMES:
        try:
            raw = _tag_value(data, tag)
            if raw is None:
                continue
            if tag == TAG_PRESENTATION_LUT_SHAPE:
                shape = raw.strip().upper() if isinstance(raw, str) else raw
                if shape not in ("INVERSE", "IDENTITY"):
                    raise ValueError(f"expected INVERSE or IDENTITY, found {raw!r}")
                values[tag] = shape
            elif tag == TAG_VIEW_POSITION:
                if not isinstance(raw, str):
                    raise ValueError(f"expected a string, found {raw!r}")
                values[tag] = raw.strip().lower() or None
            elif tag == TAG_BITS_STORED:
                values[tag] = _as_int(raw, 1, 16)  # PNG holds at most 16 bits
            else:
                values[tag] = _as_int(raw, 1, 65535)
        except (ValueError, AttributeError) as error:
            raise InputError(path, field_name(tag), str(error)) from error
    return Sidecar(
        demographics=read_demographics(data),
        invert=values.get(TAG_PRESENTATION_LUT_SHAPE) == "INVERSE",
        bit_depth=values.get(TAG_BITS_STORED),
        view=values.get(TAG_VIEW_POSITION),
        rows=values.get(TAG_ROWS),
        columns=values.get(TAG_COLUMNS),
    )


def scan_bimcv(root: str | os.PathLike, config: BimcvConfig | Mapping[str, Any] | None = None) -> BimcvScan:
    """Read the BIMCV tree under ``root`` (the ``bimcv`` folder itself; ``config.root`` is not
    used here) and also return sidecar image sizes. ``config``: a `BimcvConfig`, a mapping of
    its fields, or None for the defaults."""
    config = coerce_config(BimcvConfig, config, "bimcv")
    frontal = {str(view).strip().lower() for view in config.frontal_views}
    require_sidecar = config.require_sidecar
    root = Path(root).resolve()
    scan = BimcvScan(ReadResult())
    result = scan.result
    candidates: list[Sample] = []
    sizes: dict[str, tuple[int, int]] = {}  # by path

    for png in sorted(root.glob(IMAGE_GLOB), key=lambda p: p.as_posix()):
        if not png.is_file():
            if png.is_symlink() and not png.exists():
                scan.found.add(png.stem)
                result.skip(png, "file", f"broken symbolic link (to {os.readlink(png)})")
            elif not png.is_dir():
                scan.found.add(png.stem)
                result.skip(png, "file", "not a regular file (FIFO, socket or device); skipped")
            continue
        stem = png.stem
        scan.found.add(stem)
        entities = parse_entities(stem)
        session_dir, subject_dir = png.parent.parent, png.parent.parent.parent
        patient_id, study_id = subject_dir.name, session_dir.name
        # The walk guarantees sub-*/ses-* folders; a file name saying otherwise is misfiled.
        if "sub" in entities and f"sub-{entities['sub']}" != patient_id:
            reason = f"file name says sub-{entities['sub']} but the folder is {patient_id}"
            result.skip(png, "sub", reason)
            continue
        if "ses" in entities and f"ses-{entities['ses']}" != study_id:
            reason = f"file name says ses-{entities['ses']} but the folder is {study_id}"
            result.skip(png, "ses", reason)
            continue

        view = entities.get("vp", "").strip().lower() or None
        if view is not None and view not in frontal:
            result.exclude(EXCLUDED_VIEW)
            scan.non_frontal.add(stem)
            continue

        sidecar_path = png.with_suffix(".json")
        if not require_sidecar and not sidecar_path.exists():
            sidecar = Sidecar()
        else:
            try:
                sidecar = read_sidecar(sidecar_path)
            except InputError as error:
                result.skipped.append(error.as_skipped())
                continue

        if view is None:
            view = sidecar.view
            if view is None:
                reason = f"no vp- entity in the file name and no {TAG_VIEW_POSITION} in the sidecar"
                result.skip(png, "vp", reason)
                continue
            if view not in frontal:
                result.exclude(EXCLUDED_VIEW)
                scan.non_frontal.add(stem)
                continue

        if sidecar.size is not None:
            stored = image_size(png)  # PNG header only
            if stored is not None and stored != sidecar.size:
                result.skip(
                    sidecar_path,
                    f"{TAG_ROWS}/{TAG_COLUMNS} (Rows/Columns)",
                    f"the sidecar gives {sidecar.size[1]}x{sidecar.size[0]} but {png.name} is "
                    f"{stored[1]}x{stored[0]}: its boxes would be placed wrongly",
                )
                continue

        sample = Sample(
            image_id=stem,
            patient_id=patient_id,
            source=SOURCE,
            path=str(png),
            labels={"COVID-19": 1.0},
            invert=sidecar.invert,
            bit_depth=sidecar.bit_depth,
            view=view,
            study_id=study_id,
            demographics=dict(sidecar.demographics),
        )
        candidates.append(sample)
        if sidecar.size is not None:
            sizes[sample.path] = sidecar.size

    result.samples = check_unique_ids(candidates, result)
    scan.sizes = {s.image_id: sizes[s.path] for s in result.samples if s.path in sizes}
    return scan


def read_bimcv(root: str | os.PathLike, config: BimcvConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """Read the frontal BIMCV-COVID19+ images under ``root`` (the ``bimcv`` folder).

    Args:
        root: the BIMCV root; any folders may lie above the ``sub-*`` folders.
        config: the ``bimcv`` section (a `BimcvConfig` or a mapping of its fields; None: defaults).
    """
    return scan_bimcv(root, config).result
