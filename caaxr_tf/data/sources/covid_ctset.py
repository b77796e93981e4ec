"""The ``covid-ctset`` source (Rahimzadeh et al. 2021): 16-bit TIFF CT slices of 377 persons.

Layouts (see docs/ct.md for what the public repositories show):

* The whole set (``COVID-CTset.zip``): ``<group>/<patient>/<series>/<slice>.tif`` with group
  folders ``covid1``, ``covid2``, ``normal1`` ... ``normal10``, patient folders ``patient<N>``
  (ids unique over the set, as in ``Patient_details.csv``), series folders ``SR_2``, ``SR_3``,
  ``SR_4`` (one sequence each, different slice thicknesses) and slices ``IM00001.tif`` ...
* The training part (``Train&Validation.zip``): one folder of slices named
  ``<group>_<patient>_<series>_<slice>.tif`` (``137covid_patient1_SR_2_IM00010.tif``); its group
  prefixes (``137covid``, ``157covid``, ``normal1``..``normal5``, ``normalcd1``, ``cdnormal4``...)
  are not the whole set's group folders.
* The CSV of labelled slices (``all.csv``, ``CSV/train<k>.csv``, ``validation<k>.csv``,
  ``test<k>.csv``): columns ``filename,class``; ``filename`` in the training part's naming,
  ``class`` ``covid`` or ``normal``. For COVID patients only slices with visible infection are
  listed (as ``covid``); normal persons' slices are listed as ``normal``.

A slice is identified by ``(patient, series, slice)`` — ``image_id`` ``patient1_SR_2_IM00010`` —
which both layouts share, so CSV rows label the slices of either layout. The same slice listed
under two group prefixes (the public ``all.csv`` lists 2,125 slices of 78 normal persons twice,
under ``normal1`` and ``normal4``/``normal5``/``normal2``, with the same class) is one slice.

Every slice becomes a ``Sample`` (source ``covid-ctset``) with ``patient_id``, ``series_id``
(``patient1/SR_2``), ``slice_index`` (position in the series, by file name) and labels
``patient_covid`` (1.0/0.0 from the group name) and, for CSV-listed slices, ``slice_covid``.
Bad slices (not a TIFF, truncated, 8-bit, another size than 512x512), series with fewer than two
usable slices (whole-set layout only: the training part holds single labelled slices by
design) and bad CSV rows are reported in ``skipped``; the rest is used.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from caaxr_tf.data.ct_selection import MIN_SLICES, SLICE_SHAPE
from caaxr_tf.data.ct_series import SERIES_FOLDER, check_ct_tiff, natural_key
from caaxr_tf.data.formats import TIFF_SUFFIXES, check_regular_file
from caaxr_tf.data.records import (
    InputError,
    ReadResult,
    Sample,
    check_unique_ids,
    read_csv_table,
    resolve_inside,
)
from caaxr_tf.data.sources import coerce_config, register_source, resolve_root

SOURCE = "covid-ctset"
PATIENT_LABEL = "patient_covid"
SLICE_LABEL = "slice_covid"
CSV_COLUMNS = ("filename", "class")
CLASSES = {"covid": 1.0, "normal": 0.0}


FLAT_NAME = re.compile(
    r"^(?P<group>[^_/\\]+)_(?P<patient>[^_/\\]+)_(?P<series>SR_\d+)_(?P<slice>[^_/\\]+?)\.tiff?$",
    re.IGNORECASE,
)
EXCLUDED_SERIES = "series not selected in the config"
DUPLICATE_ROW = "CSV row repeating a labelled slice"


@dataclass(frozen=True)
class SliceKey:
    """A slice's identity in COVID-CTset, shared by the whole set and the training part."""

    patient: str
    series: str
    slice: str

    @property
    def image_id(self) -> str:
        return f"{self.patient}_{self.series}_{self.slice}"

    @property
    def series_id(self) -> str:
        return f"{self.patient}/{self.series}"


@dataclass(frozen=True)
class CovidCtsetConfig:
    """The ``covid_ctset`` section of caaxr_tf/configs/data.yaml.

    Attributes:
        root: the COVID-CTset folder (group folders or the training part's flat folder),
            relative to the data root unless absolute.
        labels_csv: the labelled-slice CSV (``filename,class``), relative to ``root`` unless
            absolute; null: no slice labels.
        series: series folders to read, e.g. ``[SR_2]``; empty: all.
        check_headers: check every TIFF header (16-bit, 512x512, complete) while reading.
    """

    root: str = "."
    labels_csv: str | None = "all.csv"
    series: tuple[str, ...] = ()
    check_headers: bool = True


def group_label(group: str) -> float | None:
    """1.0 for a COVID group (``covid1``, ``137covid``), 0.0 for a normal one, else None."""
    name = group.lower()
    if "covid" in name:
        return 1.0
    if "normal" in name:
        return 0.0
    return None


def parse_flat_name(name: str) -> tuple[str, SliceKey] | None:
    """``137covid_patient1_SR_2_IM00010.tif`` -> ``("137covid", SliceKey(...))``; None if it does not match."""
    match = FLAT_NAME.match(name)
    if match is None:
        return None
    return match["group"], SliceKey(match["patient"], match["series"].upper(), match["slice"])


@dataclass(frozen=True)
class _SliceFile:
    path: str
    group: str
    key: SliceKey
    tree: bool  # whole-set layout (a full sequence per series folder)


def _locate(path: Path, root: Path) -> _SliceFile | None:
    parts = path.relative_to(root).parts
    if len(parts) >= 4 and SERIES_FOLDER.match(parts[-2]):
        group, patient, series = parts[-4], parts[-3], parts[-2].upper()
        return _SliceFile(str(path), group, SliceKey(patient, series, path.stem), tree=True)
    parsed = parse_flat_name(path.name)
    if parsed is not None:
        return _SliceFile(str(path), parsed[0], parsed[1], tree=False)
    return None


@register_source(SOURCE, section="covid_ctset", config=CovidCtsetConfig)
def read(data_root: str | os.PathLike, config: CovidCtsetConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """COVID-CTset 16-bit CT slices with patient, series, slice index and slice/patient labels."""
    config = coerce_config(CovidCtsetConfig, config, "covid_ctset")
    return read_covid_ctset(resolve_root(data_root, config.root), config)


def read_covid_ctset(root: str | os.PathLike, config: CovidCtsetConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """Read the COVID-CTset slices under ``root`` (either layout) and the labelled-slice CSV.

    ``root`` is the set's folder itself (``config.root`` is not used here); ``config`` is a
    `CovidCtsetConfig`, a mapping of its fields or None for the defaults.

    Raises:
        SchemaError: the labels CSV exists but lacks ``filename``/``class``.
    """
    config = coerce_config(CovidCtsetConfig, config, "covid_ctset")
    root = Path(root).resolve()
    wanted_series = {str(name).upper() for name in config.series}
    result = ReadResult()
    if not root.is_dir():
        result.skip(str(root), "root", "no such folder")
        return result

    files: list[_SliceFile] = []
    bad_keys: set[SliceKey] = set()
    for folder, directories, names in os.walk(root):
        directories.sort(key=natural_key)
        for name in sorted(names, key=natural_key):
            if not name.lower().endswith(TIFF_SUFFIXES):
                continue
            path = Path(folder) / name
            located = _locate(path, root)
            if located is None:
                result.skip(str(path), "path", "expected <group>/<patient>/SR_<n>/<slice>.tif or "
                            "<group>_<patient>_SR_<n>_<slice>.tif")
                continue
            if wanted_series and located.key.series not in wanted_series:
                result.exclude(EXCLUDED_SERIES)
                continue
            try:  # whatever check_headers says: a FIFO would block whoever opens it
                check_regular_file(located.path, "file")
            except InputError as error:
                result.skipped.append(error.as_skipped())
                bad_keys.add(located.key)
                continue
            if config.check_headers:
                try:
                    check_ct_tiff(located.path, SLICE_SHAPE)
                except InputError as error:
                    result.skipped.append(error.as_skipped())
                    bad_keys.add(located.key)
                    continue
            files.append(located)

    files = _drop_conflicting_patients(files, result)
    series: dict[tuple[str, str], list[_SliceFile]] = defaultdict(list)
    for item in files:
        series[(item.key.patient, item.key.series)].append(item)

    slice_labels = {}
    if config.labels_csv:
        csv_path = Path(config.labels_csv)
        csv_path = csv_path if csv_path.is_absolute() else root / csv_path
        present = {item.key for item in files}
        slice_labels = read_slice_labels(csv_path, present, bad_keys, files, result, root)

    candidates: list[Sample] = []
    for (patient, series_name) in sorted(series, key=lambda k: (natural_key(k[0]), natural_key(k[1]))):
        members = sorted(series[(patient, series_name)], key=lambda f: (natural_key(f.key.slice), f.path))
        unique = {}
        for item in members:
            unique.setdefault(item.key, item)  # a duplicate is reported by check_unique_ids below
        whole_set = any(item.tree for item in members)
        if whole_set and len(unique) < MIN_SLICES:
            folder = os.path.dirname(members[0].path)
            result.skip(folder, "slices", f"{len(unique)} usable slice; selection needs at least "
                        f"{MIN_SLICES} slices of one sequence")
            continue
        position = {key: index for index, key in enumerate(unique)}
        for item in members:
            labels = {PATIENT_LABEL: group_label(item.group)}
            if item.key in slice_labels:
                labels[SLICE_LABEL] = slice_labels[item.key]
            candidates.append(Sample(
                image_id=item.key.image_id, patient_id=patient, source=SOURCE, path=item.path,
                labels=labels, bit_depth=16, series_id=item.key.series_id,
                slice_index=position[item.key],
            ))
    result.samples = check_unique_ids(candidates, result)
    return result


def _drop_conflicting_patients(files: list[_SliceFile], result: ReadResult) -> list[_SliceFile]:
    """Drop slices without a group label, and patients found in both COVID and normal groups."""
    labelled = []
    for item in files:
        if group_label(item.group) is None:
            result.skip(item.path, "group", f"{item.group!r} names neither a covid nor a normal group")
        else:
            labelled.append(item)
    groups: dict[str, dict[float, str]] = defaultdict(dict)
    for item in labelled:
        groups[item.key.patient].setdefault(group_label(item.group), item.group)
    conflicting = {patient for patient, labels in groups.items() if len(labels) > 1}
    for patient in sorted(conflicting, key=natural_key):
        names = groups[patient]
        first = next(item for item in labelled if item.key.patient == patient)
        result.skip(os.path.dirname(first.path), "group",
                    f"patient {patient} is in a covid group ({names[1.0]}) and a normal group "
                    f"({names[0.0]}); its slices are left out")
    return [item for item in labelled if item.key.patient not in conflicting]


def read_slice_labels(csv_path: Path, present: set[SliceKey], bad_keys: set[SliceKey],
                      files: list[_SliceFile], result: ReadResult, root: Path | None = None) -> dict[SliceKey, float]:
    """``slice_covid`` per listed slice from a ``filename,class`` CSV; bad rows go to ``result``.

    A row's file name is matched by its last part, after checking that it stays inside
    ``root`` (default: the CSV's folder): an absolute path or one whose ``..`` parts climb out
    is reported and skipped (``records.resolve_inside``), not used by its base name. A missing
    file is reported and gives no labels; a CSV without the columns raises ``SchemaError``.
    """
    if not csv_path.is_file():
        reason = "labelled-slice CSV not found"
        if os.path.lexists(csv_path):  # a FIFO or a folder: named, never opened
            try:
                check_regular_file(csv_path, "file")
            except InputError as error:
                reason = error.reason
        result.skip(str(csv_path), "file", f"{reason}; slices get no slice labels")
        return {}
    table = read_csv_table(csv_path, CSV_COLUMNS)
    patient_covid = {item.key.patient: group_label(item.group) for item in files}
    labels: dict[SliceKey, float] = {}
    first_row: dict[SliceKey, tuple[int, float]] = {}
    where = str(csv_path)
    for index, (filename, value) in enumerate(zip(table["filename"], table["class"])):
        row = index + 2
        try:
            resolve_inside(root or csv_path.parent, filename)
        except ValueError as error:
            result.skip(where, f"row {row}: filename", f"{error}; row left out")
            continue
        parsed = parse_flat_name(Path(filename.strip()).name)
        if parsed is None:
            result.skip(where, f"row {row}: filename",
                        f"{filename!r} is not <group>_<patient>_SR_<n>_<slice>.tif")
            continue
        group, key = parsed
        label = CLASSES.get(value.strip().lower())
        if label is None:
            result.skip(where, f"row {row}: class", f"expected covid or normal, found {value!r}")
            continue
        if group_label(group) is not None and group_label(group) < label:
            result.skip(where, f"row {row}: class", f"a covid label in the normal group {group!r}")
            continue
        if key in first_row:
            first, first_label = first_row[key]
            if first_label != label:
                result.skip(where, f"row {row}: class",
                            f"{key.image_id} is labelled {value.strip()!r} here and differently at row {first}")
            else:
                result.exclude(DUPLICATE_ROW)
            continue
        first_row[key] = (row, label)
        if key not in present:
            if key not in bad_keys:  # a bad slice file is reported once, where it was found
                result.skip(where, f"row {row}: filename", f"no slice {key.image_id} under the data root")
            continue
        if patient_covid.get(key.patient) == 0.0 and label == 1.0:
            result.skip(where, f"row {row}: class", f"a covid label for a slice of normal patient {key.patient}")
            continue
        labels[key] = label
    return labels
