"""The published patient pipeline: select → classify → decide, over every slice of a patient.

For each series (one sequence) of a patient every slice is decoded once (in threads: OpenCV
and pydicom release the GIL for the heavy part), its dark pixels counted, the open-lung slices
kept (``caaxr_tf.ct.selection``) and classified in batches; the patient's verdicts come from
all its kept slices with both thresholds (``caaxr_tf.ct.patient.decide_patient``). One
series' raw slices are in memory at a time (a 406-slice series: 406 x 512 KB = 203 MiB).

    classify = lambda images: ...   # float32 [B, S, S, 1] raw values -> bool [B]: COVID slices
    result = classify_patient("patient7", find_ct_series(folder).series, classify, image_size=512)
    result.decision.covid_threshold2, result.kept_paths

``evaluate_patients`` runs it over the test patients of a ``covid-ctset`` protocol (truth: the
patient's group folder, ``covid*`` or ``normal*``) and counts the outcomes per threshold.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from caaxr_tf.ct.patient import PatientDecision, decide_patient
from caaxr_tf.ct.selection import MIN_SLICES, SLICE_SHAPE, SliceSelection, dark_pixel_counts, select_from_counts
from caaxr_tf.data.records import InputError, Skipped
from caaxr_tf.data.schema import MANIFEST_FILE

SliceClassifier = Callable[[np.ndarray], np.ndarray]
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class SeriesOutcome:
    """Selection and classification of one series: ``paths`` are its decoded slices in order,
    ``selection`` one count/flag per path (None with fewer than two decodable slices) and
    ``covid`` one flag per kept slice."""

    series_id: str
    folder: str
    paths: list[str] = field(default_factory=list)
    selection: SliceSelection | None = None
    covid: list[bool] = field(default_factory=list)

    @property
    def kept_paths(self) -> list[str]:
        if self.selection is None:
            return []
        return [path for path, kept in zip(self.paths, self.selection.kept) if kept]


@dataclass
class PatientResult:
    """A patient's series outcomes, the decision over all its kept slices and what was skipped."""

    patient_id: str
    series: list[SeriesOutcome]
    decision: PatientDecision
    skipped: list[Skipped] = field(default_factory=list)
    truth: float | None = None  # 1.0 COVID, 0.0 normal, None unknown

    @property
    def kept_paths(self) -> list[str]:
        return [path for outcome in self.series for path in outcome.kept_paths]

    @property
    def covid_paths(self) -> list[str]:
        return [path for outcome in self.series for path, covid in zip(outcome.kept_paths, outcome.covid) if covid]

    @property
    def num_slices(self) -> int:
        return sum(len(outcome.paths) for outcome in self.series)

    def as_record(self) -> dict[str, Any]:
        """JSON fields for ``caaxr_tf.predict``: the verdicts, the counts, the kept slices."""
        decision = self.decision
        return {
            "patient": self.patient_id,
            "verdict_threshold1": "covid" if decision.covid_threshold1 else "normal",
            "verdict_threshold2": "covid" if decision.covid_threshold2 else "normal",
            "covid_slices": decision.covid_slices,
            "selected_slices": decision.selected,
            "slices": self.num_slices,
            "series": [
                {"series": outcome.series_id, "folder": outcome.folder, "slices": len(outcome.paths),
                 "threshold": None if outcome.selection is None else outcome.selection.threshold,
                 "kept": len(outcome.kept_paths), "covid": int(sum(outcome.covid))}
                for outcome in self.series
            ],
            "kept_slices": self.kept_paths,
            "covid_slice_files": self.covid_paths,
            "skipped": [skipped.as_dict() for skipped in self.skipped],
        }


def read_slices(series: Any, workers: int = DEFAULT_WORKERS) -> tuple[list[str], np.ndarray, list[Skipped]]:
    """Decode every slice of a ``CTSeries`` (threads): the decodable paths, their uint16
    ``[n, 512, 512]`` pixels in order, and the slices that could not be decoded."""

    def read(index: int) -> np.ndarray | InputError:
        try:
            return series.read(index, SLICE_SHAPE)
        except InputError as error:
            return error

    if workers > 1 and len(series) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(pool.map(read, range(len(series))))
    else:
        decoded = [read(index) for index in range(len(series))]
    paths, pixels, skipped = [], [], []
    for path, item in zip(series.paths, decoded):
        if isinstance(item, InputError):
            skipped.append(item.as_skipped())
        else:
            paths.append(path)
            pixels.append(item)
    stacked = np.stack(pixels) if pixels else np.zeros((0, *SLICE_SHAPE), np.uint16)
    return paths, stacked, skipped


def model_inputs(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """uint16 ``[n, H, W]`` raw slices → the model's float32 ``[n, S, S, 1]`` (``fit_raw``)."""
    if pixels.shape[1:3] == (image_size, image_size):
        return pixels.astype(np.float32)[..., None]
    from caaxr_tf.ct.inputs import fit_raw

    return fit_raw(pixels[..., None], image_size).numpy().astype(np.float32)


def classify_in_batches(pixels: np.ndarray, classify: SliceClassifier, image_size: int,
                        batch_size: int) -> list[bool]:
    """COVID flags of ``[n, H, W]`` raw slices, ``batch_size`` at a time."""
    flags: list[bool] = []
    for start in range(0, len(pixels), batch_size):
        batch = model_inputs(pixels[start:start + batch_size], image_size)
        flags.extend(bool(flag) for flag in np.asarray(classify(batch)).reshape(-1))
    return flags


def classify_patient(patient_id: str, series: Sequence[Any], classify: SliceClassifier, image_size: int = 512,
                     *, batch_size: int = 16, workers: int = DEFAULT_WORKERS, truth: float | None = None,
                     skipped: Sequence[Skipped] = ()) -> PatientResult:
    """Select, classify and decide over the ``CTSeries`` of one patient (see the module docstring).

    A series with fewer than two decodable slices is reported in ``skipped`` and contributes no
    slice; a patient with no kept slice is normal under both thresholds."""
    outcomes: list[SeriesOutcome] = []
    all_skipped = list(skipped)
    flags: list[bool] = []
    for item in series:
        paths, pixels, bad = read_slices(item, workers)
        all_skipped.extend(bad)
        outcome = SeriesOutcome(series_id=item.series_id, folder=item.folder, paths=paths)
        outcomes.append(outcome)
        if len(paths) < MIN_SLICES:
            all_skipped.append(Skipped(item.folder, "slices", f"{len(paths)} decodable slice(s); "
                                       f"selection needs at least {MIN_SLICES}"))
            continue
        outcome.selection = select_from_counts(dark_pixel_counts(pixels))
        outcome.covid = classify_in_batches(pixels[outcome.selection.kept], classify, image_size, batch_size)
        flags.extend(outcome.covid)
        del pixels
    decision = decide_patient(np.array(flags, dtype=bool))
    return PatientResult(patient_id, outcomes, decision, all_skipped, truth)


# --------------------------------------------------------------------------- a protocol's patients


def split_patients(protocol_dir: str | os.PathLike, split: str = "test", fold: int = 1) -> list[str]:
    """The patients with records in ``split`` of ``fold`` (the protocol's manifest.csv), sorted."""
    from caaxr_tf.data.ct_series import natural_key

    path = Path(protocol_dir) / MANIFEST_FILE
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        column = f"split_fold{fold}"
        if reader.fieldnames is None or column not in reader.fieldnames or "patient_id" not in reader.fieldnames:
            raise ValueError(f"{path}: no patient_id / {column} column")
        patients = {row["patient_id"] for row in reader if row[column] == split}
    if not patients:
        raise ValueError(f"{path}: no patients in the {split} split of fold {fold}")
    return sorted(patients, key=natural_key)


def patient_series(data_root: str | os.PathLike, patients: Sequence[str]
                   ) -> tuple[dict[str, tuple[float | None, list[Any]]], list[Skipped]]:
    """Every series of ``patients`` in a COVID-CTset folder (all slices, labelled or not):
    ``{patient: (truth, [CTSeries])}`` and the slices the reader skipped."""
    from caaxr_tf.data.ct_series import CTSeries
    from caaxr_tf.data.sources.covid_ctset import PATIENT_LABEL, read_covid_ctset

    wanted = set(patients)
    result = read_covid_ctset(data_root, {"labels_csv": None})
    by_series: dict[str, list] = defaultdict(list)
    truth: dict[str, float | None] = {}
    for sample in result.samples:
        if sample.patient_id in wanted:
            by_series[sample.series_id].append(sample)
            truth[sample.patient_id] = sample.labels.get(PATIENT_LABEL)
    found: dict[str, tuple[float | None, list[Any]]] = {p: (truth.get(p), []) for p in patients}
    for series_id in sorted(by_series):
        members = sorted(by_series[series_id], key=lambda s: s.slice_index)
        patient = members[0].patient_id
        found[patient][1].append(CTSeries(
            series_id=series_id, patient_id=patient, kind="tiff", folder=os.path.dirname(members[0].path),
            paths=tuple(s.path for s in members), image_ids=tuple(s.image_id for s in members)))
    skipped = [s for s in result.skipped if wanted & set(Path(s.path).parts)]
    return found, skipped


def evaluate_patients(data_root: str | os.PathLike, patients: Sequence[str], classify: SliceClassifier,
                      image_size: int, *, batch_size: int = 16, workers: int = DEFAULT_WORKERS
                      ) -> tuple[dict[str, Any], list[PatientResult]]:
    """Run the patient pipeline over ``patients`` of a COVID-CTset folder; the summary counts
    per threshold (``correct``, ``covid_to_normal``, ``normal_to_covid``) and each result."""
    found, skipped = patient_series(data_root, patients)
    missing = [patient for patient, (_, series) in found.items() if not series]
    if missing:
        raise ValueError(f"{data_root}: no slices of patient(s) {', '.join(missing[:5])}: "
                         "--patients must be the COVID-CTset folder the records were built from")
    results = [classify_patient(patient, series, classify, image_size, batch_size=batch_size, workers=workers,
                                truth=truth, skipped=[s for s in skipped if patient in Path(s.path).parts])
               for patient, (truth, series) in found.items()]
    return patient_summary(results), results


def patient_summary(results: Sequence[PatientResult]) -> dict[str, Any]:
    """Counts of the verdicts against the truth, per threshold."""
    known = [r for r in results if r.truth is not None]
    summary: dict[str, Any] = {
        "patients": len(known),
        "covid_patients": sum(r.truth >= 0.5 for r in known),
        "slices": sum(r.num_slices for r in known),
        "selected_slices": sum(r.decision.selected for r in known),
        "skipped_slices": sum(len(r.skipped) for r in results),
    }
    for key, attribute in (("threshold1", "covid_threshold1"), ("threshold2", "covid_threshold2")):
        verdicts = [(r.truth >= 0.5, getattr(r.decision, attribute)) for r in known]
        summary[key] = {
            "correct": sum(truth == verdict for truth, verdict in verdicts),
            "covid_to_normal": sum(truth and not verdict for truth, verdict in verdicts),
            "normal_to_covid": sum(verdict and not truth for truth, verdict in verdicts),
            "accuracy": (sum(truth == verdict for truth, verdict in verdicts) / len(verdicts)) if verdicts else None,
        }
    return summary


def patient_rows(results: Sequence[PatientResult]) -> tuple[list[str], list[list[Any]]]:
    """The per-patient CSV: truth, slices, selected, COVID slices, both verdicts."""
    header = ["patient_id", "truth", "series", "slices", "selected", "covid_slices", "verdict_threshold1",
              "verdict_threshold2", "skipped"]
    rows = []
    for r in results:
        truth = "" if r.truth is None else "covid" if r.truth >= 0.5 else "normal"
        rows.append([r.patient_id, truth, len(r.series), r.num_slices, r.decision.selected, r.decision.covid_slices,
                     "covid" if r.decision.covid_threshold1 else "normal",
                     "covid" if r.decision.covid_threshold2 else "normal", len(r.skipped)])
    return header, rows
