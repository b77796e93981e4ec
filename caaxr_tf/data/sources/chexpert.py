"""The ``chexpert`` source: CheXpert (small) ``train.csv`` / ``valid.csv``, 14 observations per image.

Labels are ``1.0`` (positive), ``0.0`` (negative), ``-1.0`` (uncertain) or blank (not
mentioned, read as 0.0). The uncertain policy comes from the config: ``positive`` (U-Ones),
``negative`` (U-Zeros) or ``exclude`` (keep -1.0; the protocols leave such images out of the
classes that depend on the uncertain observation).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Mapping

from caaxr_tf.data.records import ReadResult, Sample, check_unique_ids, read_csv_table, resolve_inside
from caaxr_tf.data.sources import coerce_config, register_source, resolve_root

SOURCE = "chexpert"
OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
PATH_COLUMN = "Path"
FRONTAL_COLUMN = "Frontal/Lateral"
VIEW_COLUMN = "AP/PA"
REQUIRED_COLUMNS = (PATH_COLUMN, FRONTAL_COLUMN, *OBSERVATIONS)
UNCERTAIN_POLICIES = {"positive": 1.0, "negative": 0.0, "exclude": -1.0}
EXCLUDED_VIEW = "non-frontal view"

_PATIENT = re.compile(r"^patient\d+$")
_STUDY = re.compile(r"^study\d+$")


@dataclass(frozen=True)
class ChexpertConfig:
    """The ``chexpert`` section of caaxr_tf/configs/data.yaml.

    Attributes:
        root: the CheXpert folder, relative to the data root unless absolute; the CSVs'
            ``Path`` values are relative to it.
        csv_files: the CSVs to read, relative to ``root``.
        frontal_only: lateral views are left out (counted under ``excluded``).
        uncertain: the -1 policy: ``exclude`` (keep -1; the protocols leave such images out of
            the classes an uncertain observation decides), ``positive`` (U-Ones) or
            ``negative`` (U-Zeros).
    """

    root: str = "chexpert"
    csv_files: tuple[str, ...] = ("CheXpert-v1.0-small/train.csv", "CheXpert-v1.0-small/valid.csv")
    frontal_only: bool = True
    uncertain: Literal["exclude", "positive", "negative"] = "exclude"


def label_values(uncertain: str) -> dict[str, float]:
    """Map each accepted label cell (stripped text) to its value under the uncertain policy."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"chexpert.uncertain must be one of {sorted(UNCERTAIN_POLICIES)}, got {uncertain!r}"
        )
    values = {"": 0.0}
    for text, value in (("1", 1.0), ("0", 0.0), ("-1", UNCERTAIN_POLICIES[uncertain])):
        for spelling in (text, f"{text}.0"):
            values[spelling] = value
    return values


def image_id_from_path(relative: str) -> str:
    """The CSV ``Path`` without its ``CheXpert-v1.0*`` folder and suffix.

    ``CheXpert-v1.0-small/train/patient1/study1/view1.jpg`` -> ``train/patient1/study1/view1``.
    """
    parts = PurePosixPath(relative.strip().replace("\\", "/")).parts
    if parts and parts[0].startswith("CheXpert-v1.0"):
        parts = parts[1:]
    return str(PurePosixPath(*parts).with_suffix("")) if parts else ""


@register_source(SOURCE, section="chexpert", config=ChexpertConfig)
def read(data_root: str | os.PathLike, config: ChexpertConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """CheXpert frontal images with their 14 observations (uncertain labels by the config's policy)."""
    config = coerce_config(ChexpertConfig, config, "chexpert")
    return read_chexpert(resolve_root(data_root, config.root), config)


def read_chexpert(root: str | os.PathLike, config: ChexpertConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """Read the CheXpert CSVs listed in ``config`` (paths relative to ``root``).

    Args:
        root: the ``chexpert`` folder itself (``config.root`` is not used here); ``Path`` values
            in the CSVs are relative to it.
        config: a `ChexpertConfig`, a mapping of its fields (missing keys take the defaults) or
            None for the defaults.

    Raises:
        SchemaError: a CSV is missing or lacks ``Path``, ``Frontal/Lateral`` or an observation.
        ConfigError: an unknown key or a bad value (e.g. ``uncertain: maybe``).
    """
    config = coerce_config(ChexpertConfig, config, "chexpert")
    values = label_values(config.uncertain)
    frontal_only = config.frontal_only
    root = Path(root).resolve()
    result = ReadResult()
    # Every schema is checked before any row is read.
    tables = [
        (str(root / name), read_csv_table(root / name, REQUIRED_COLUMNS))
        for name in config.csv_files
    ]

    candidates: list[Sample] = []
    for csv_path, table in tables:
        paths = table[PATH_COLUMN].tolist()
        frontal = table[FRONTAL_COLUMN].tolist()
        views = table[VIEW_COLUMN].tolist() if VIEW_COLUMN in table.columns else [""] * len(table)
        labels_table = table[list(OBSERVATIONS)].to_numpy()
        for index, relative in enumerate(paths):
            row = index + 2
            relative = relative.strip()
            if not relative:
                result.skip(csv_path, f"row {row}: {PATH_COLUMN}", "empty path")
                continue
            kind = frontal[index].strip().lower()
            if kind not in ("frontal", "lateral"):
                reason = f"expected Frontal or Lateral, found {frontal[index]!r}"
                result.skip(csv_path, f"row {row}: {FRONTAL_COLUMN}", reason)
                continue
            if frontal_only and kind != "frontal":
                result.exclude(EXCLUDED_VIEW)
                continue

            labels: dict[str, float] = {}
            bad_column = None
            for observation, cell in zip(OBSERVATIONS, labels_table[index]):
                value = values.get(cell.strip())
                if value is None:
                    bad_column = (observation, cell)
                    break
                labels[observation] = value
            if bad_column is not None:
                result.skip(
                    csv_path,
                    f"row {row}: {bad_column[0]}",
                    f"unknown label {bad_column[1]!r} (expected 1.0, 0.0, -1.0 or blank)",
                )
                continue

            try:
                image_path = resolve_inside(root, relative)
            except ValueError as error:
                result.skip(csv_path, f"row {row}: {PATH_COLUMN}", str(error))
                continue
            parts = PurePosixPath(relative.replace("\\", "/")).parts
            patient = next((part for part in parts if _PATIENT.match(part)), None)
            study = next((part for part in parts if _STUDY.match(part)), "")
            if patient is None:
                reason = f"no patientNNNNN folder in {relative!r}"
                result.skip(csv_path, f"row {row}: {PATH_COLUMN}", reason)
                continue
            if not image_path.is_file():
                reason = f"image file not found: {image_path}"
                result.skip(csv_path, f"row {row}: {PATH_COLUMN}", reason)
                continue
            candidates.append(
                Sample(
                    image_id=image_id_from_path(relative),
                    patient_id=patient,
                    source=SOURCE,
                    path=str(image_path),
                    labels=labels,
                    view=views[index].strip().lower() or kind,
                    study_id=study,
                )
            )
    result.samples = check_unique_ids(candidates, result)
    return result
