"""CT slice sequences: 16-bit TIFF series folders and DICOM series, on one raw scale.

Raw scale. COVID-CTset slices are the scanner's stored values exported to 16-bit TIFF
(BitsStored 12, RescaleSlope 1, RescaleIntercept -1024), so ``raw = HU + 1024`` (air ~ 24,
lung ~ 100..300, soft tissue ~ 1064, bone higher; values up to about 5,000). DICOM series
from other scanners are brought to the same scale, so that the constants of slice selection
(dark = raw < 300, i.e. HU < -724) and models trained on COVID-CTset apply unchanged:

    HU  = modality LUT (RescaleSlope * stored + RescaleIntercept, or the LUT sequence)
    raw = clip(round(HU + 1024), 0, 65535) as uint16

Values below -1024 HU (padding outside the reconstruction circle, often -2048 or -3024) become
0, which selection counts as dark like air.

Slice order. A TIFF series is ordered by file name, numbers compared as numbers
(``IM2`` before ``IM10``). A DICOM series is ordered by InstanceNumber when every slice has a
distinct one, else by ImagePositionPatient projected on the slice normal (the cross product of
the two ImageOrientationPatient direction cosines), largest first (for axial slices: from the
head down, the usual numbering), else it is reported and left out. Selection does not depend
on the order; ``slice_index`` does.

Bad input is reported as ``Skipped(path, field, reason)`` and the rest is used: a file with a
``.tif`` name that is not a TIFF or is truncated, an 8-bit slice, a slice of another size
than 512x512, a series left with fewer than two usable slices, files of other patients in a
DICOM series (the patient with most slices is kept). A FIFO, socket, device or broken link
under a searched folder is reported and never opened (opening a FIFO blocks).
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from caaxr_tf.data.ct_selection import MIN_SLICES, SLICE_SHAPE
from caaxr_tf.data.dicom import check_pixel_data, read_dataset
from caaxr_tf.data.formats import (
    TIFF_MAGIC,
    TIFF_SUFFIXES,
    TiffInfo,
    check_regular_file,
    is_dicom,
    read_tiff_info,
)
from caaxr_tf.data.records import InputError, ReadResult, Sample, Skipped, check_unique_ids

HU_OFFSET = 1024
RAW_MAX = 65535
DICOM_SOURCE = "ct-dicom"
SERIES_FOLDER = re.compile(r"^SR_\d+$", re.IGNORECASE)


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``IM2`` < ``IM10``."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", name) if part)


# --- TIFF slices (the header parsing is caaxr_tf.data.formats.read_tiff_info) ---------------


def check_ct_tiff(path: str | os.PathLike, shape: tuple[int, int] = SLICE_SHAPE) -> TiffInfo:
    """Check, from the header alone, that a file is a one-channel 16-bit unsigned slice of ``shape``.

    Raises:
        InputError: naming the file and the TIFF field (``BitsPerSample``, ``ImageWidth``...).
    """
    path = os.fspath(path)
    info = read_tiff_info(path)
    if info.samples != 1:
        raise InputError(path, "SamplesPerPixel", f"expected one grey channel, found {info.samples}")
    if info.bits != 16:
        raise InputError(path, "BitsPerSample", f"expected a 16-bit slice, found {info.bits}-bit")
    if info.sample_format != 1:
        kind = {2: "signed integers", 3: "floating point"}.get(info.sample_format, f"format {info.sample_format}")
        raise InputError(path, "SampleFormat", f"expected unsigned integers, found {kind}")
    if (info.height, info.width) != tuple(shape):
        raise InputError(path, "ImageWidth/ImageLength",
                         f"expected {shape[1]}x{shape[0]}, found {info.width}x{info.height}")
    return info


def read_ct_tiff(path: str | os.PathLike, shape: tuple[int, int] = SLICE_SHAPE) -> np.ndarray:
    """Decode a 16-bit TIFF slice exactly (OpenCV ``IMREAD_UNCHANGED``) as uint16 ``shape``.

    Raises:
        InputError: not a TIFF, undecodable, 8-bit, several channels or another size.
    """
    path = os.fspath(path)
    check_regular_file(path, "file")  # before opening: a FIFO would block
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise InputError(path, "file", f"cannot be read ({error.strerror or error})") from error
    if data[:4].tobytes() not in TIFF_MAGIC:
        raise InputError(path, "file", "not a TIFF file (unknown signature)")
    read_tiff_info(data.tobytes(), path)  # truncated or multi-page (OpenCV would decode page 1)
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise InputError(path, "file", "could not be decoded (corrupt or truncated TIFF data)")
    if pixels.ndim != 2:
        raise InputError(path, "SamplesPerPixel", f"expected one grey channel, found {pixels.shape[2]}")
    if pixels.dtype != np.uint16:
        bits = pixels.dtype.itemsize * 8
        if bits != 16:
            raise InputError(path, "BitsPerSample", f"expected a 16-bit slice, found {bits}-bit")
        raise InputError(path, "SampleFormat", f"expected unsigned 16-bit pixels, found {pixels.dtype}")
    if pixels.shape != tuple(shape):
        raise InputError(path, "ImageWidth/ImageLength",
                         f"expected {shape[1]}x{shape[0]}, found {pixels.shape[1]}x{pixels.shape[0]}")
    return pixels


# --- DICOM slices ------------------------------------------------------------------------


def hu_to_raw(hu: np.ndarray) -> np.ndarray:
    """Hounsfield units -> the COVID-CTset raw scale: ``clip(round(HU + 1024), 0, 65535)`` uint16."""
    return np.clip(np.rint(np.asarray(hu, dtype=np.float64) + HU_OFFSET), 0, RAW_MAX).astype(np.uint16)


def dicom_to_raw(path: str, ds: Dataset) -> np.ndarray:
    """Decode one CT slice and express it as raw = HU + 1024 (see the module docstring)."""
    check_pixel_data(path, ds)
    try:
        stored = ds.pixel_array
    except Exception as error:  # decoders raise many types on bad data
        raise InputError(path, "PixelData", f"cannot be decoded ({type(error).__name__}: {error})") from error
    if stored.ndim != 2:
        raise InputError(path, "PixelData", f"expected one frame, got shape {stored.shape}")
    try:
        hu = apply_modality_lut(stored, ds)
    except Exception as error:
        field_name = "ModalityLUTSequence" if "ModalityLUTSequence" in ds else "RescaleSlope"
        raise InputError(path, field_name, f"modality LUT cannot be applied ({error})") from error
    return hu_to_raw(hu)


def read_ct_dicom(path: str | os.PathLike, shape: tuple[int, int] = SLICE_SHAPE) -> np.ndarray:
    """Read one DICOM CT slice as uint16 raw = HU + 1024 of ``shape``."""
    path = os.fspath(path)
    pixels = dicom_to_raw(path, read_dataset(path))
    if pixels.shape != tuple(shape):
        raise InputError(path, "Rows/Columns",
                         f"expected {shape[1]}x{shape[0]}, found {pixels.shape[1]}x{pixels.shape[0]}")
    return pixels


@dataclass(frozen=True)
class _DicomHeader:
    path: str
    patient_id: str
    series_uid: str
    sop_uid: str
    study_uid: str
    instance: int | None
    position: float | None


def _slice_position(ds: Dataset) -> float | None:
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.size != 6 or position.size != 3:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    return float(position @ normal) if np.any(normal) else None


def _dicom_header(path: str, shape: tuple[int, int]) -> _DicomHeader:
    ds = read_dataset(path, pixels=False)
    check_pixel_data(path, ds)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if (rows, columns) != tuple(shape):
        raise InputError(path, "Rows/Columns", f"expected {shape[1]}x{shape[0]}, found {columns}x{rows}")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits != 16:
        raise InputError(path, "BitsAllocated", f"expected 16-bit CT pixels, found {bits}")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if not series_uid:
        raise InputError(path, "SeriesInstanceUID", "missing or empty")
    patient = str(ds.get("PatientID", "") or "").strip()
    if not patient:
        raise InputError(path, "PatientID", "missing or empty")
    try:
        instance = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    return _DicomHeader(
        path=path, patient_id=patient, series_uid=series_uid,
        sop_uid=str(ds.get("SOPInstanceUID", "") or "").strip() or Path(path).stem,
        study_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
        instance=instance, position=_slice_position(ds),
    )


def _order_dicom(headers: list[_DicomHeader]) -> list[_DicomHeader] | None:
    instances = [h.instance for h in headers]
    if None not in instances and len(set(instances)) == len(instances):
        return sorted(headers, key=lambda h: h.instance)
    positions = [h.position for h in headers]
    if None not in positions and len(set(positions)) == len(positions):
        return sorted(headers, key=lambda h: -h.position)  # head end first, as scanners number them
    return None


# --- series ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTSeries:
    """One slice sequence of one patient, its files in slice order.

    ``kind`` is ``"tiff"`` or ``"dicom"``; ``series_id`` is ``<patient folder>/<series folder>``
    for TIFF folders (``patient7/SR_2``) and the SeriesInstanceUID for DICOM.
    """

    series_id: str
    patient_id: str
    kind: str
    folder: str
    paths: tuple[str, ...]
    study_id: str = ""
    image_ids: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int, shape: tuple[int, int] = SLICE_SHAPE) -> np.ndarray:
        """Raw uint16 pixels of slice ``index`` (``InputError`` when it cannot be decoded)."""
        reader = read_ct_tiff if self.kind == "tiff" else read_ct_dicom
        return reader(self.paths[index], shape)

    def iter_slices(self, shape: tuple[int, int] = SLICE_SHAPE) -> Iterator[tuple[str, np.ndarray | InputError]]:
        """``(path, pixels)`` per slice in order; an undecodable slice gives its ``InputError``."""
        for index, path in enumerate(self.paths):
            try:
                yield path, self.read(index, shape)
            except InputError as error:
                yield path, error


@dataclass
class SeriesScan:
    """What ``find_ct_series`` found: usable series and everything it left out."""

    series: list[CTSeries] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _tiff_series(folder: Path, names: list[str], shape: tuple[int, int], scan: SeriesScan,
                 check: bool) -> None:
    paths = []
    for name in sorted(names, key=natural_key):
        path = str(folder / name)
        if check:
            try:
                check_ct_tiff(path, shape)
            except InputError as error:
                scan.skipped.append(error.as_skipped())
                continue
        paths.append(path)
    if not paths:
        return
    if len(paths) < MIN_SLICES:
        scan.skipped.append(Skipped(str(folder), "slices", _too_few(len(paths))))
        return
    if SERIES_FOLDER.match(folder.name) and folder.parent.name:
        patient, series_id = folder.parent.name, f"{folder.parent.name}/{folder.name}"
    else:
        patient, series_id = folder.name, folder.name
    scan.series.append(CTSeries(series_id=series_id, patient_id=patient, kind="tiff",
                                folder=str(folder), paths=tuple(paths),
                                image_ids=tuple(Path(p).stem for p in paths)))


def _too_few(count: int) -> str:
    return (f"{count} usable slice{'s' if count != 1 else ''}; selection needs at least "
            f"{MIN_SLICES} slices of one sequence")


def _dicom_series(files: list[str], shape: tuple[int, int], scan: SeriesScan) -> None:
    groups: dict[str, list[_DicomHeader]] = defaultdict(list)
    for path in files:
        try:
            header = _dicom_header(path, shape)
        except InputError as error:
            scan.skipped.append(error.as_skipped())
            continue
        groups[header.series_uid].append(header)
    for series_uid in sorted(groups):
        headers = groups[series_uid]
        patients = Counter(h.patient_id for h in headers)
        # The patient with most slices keeps the series (ties: the first in sorted order).
        patient = min(patients, key=lambda p: (-patients[p], p))
        for header in headers:
            if header.patient_id != patient:
                reason = (f"patient {header.patient_id!r} in series {series_uid} of patient {patient!r} "
                          f"({patients[patient]} slices); left out")
                scan.skipped.append(Skipped(header.path, "PatientID", reason))
        headers = [h for h in headers if h.patient_id == patient]
        folder = os.path.commonpath([os.path.dirname(h.path) for h in headers])
        if len(headers) < MIN_SLICES:
            scan.skipped.append(Skipped(headers[0].path, "SeriesInstanceUID",
                                        f"series {series_uid}: {_too_few(len(headers))}"))
            continue
        ordered = _order_dicom(headers)
        if ordered is None:
            scan.skipped.append(Skipped(folder, "InstanceNumber",
                                        f"series {series_uid}: slice order unknown (InstanceNumber and "
                                        "ImagePositionPatient missing or repeated); series left out"))
            continue
        scan.series.append(CTSeries(series_id=series_uid, patient_id=patient, kind="dicom", folder=folder,
                                    paths=tuple(h.path for h in ordered), study_id=ordered[0].study_uid,
                                    image_ids=tuple(h.sop_uid for h in ordered)))


def find_ct_series(path: str | os.PathLike, shape: tuple[int, int] = SLICE_SHAPE,
                   check_headers: bool = True) -> SeriesScan:
    """Find the slice series under ``path`` (a series folder, patient folder or any tree).

    Each folder holding ``.tif``/``.tiff`` files is one TIFF series; DICOM files anywhere under
    ``path`` are grouped by SeriesInstanceUID. With ``check_headers`` every TIFF header is
    checked (16-bit, one channel, ``shape``, complete) without decoding the pixels; DICOM
    headers are always read (Rows/Columns, PatientID, order).
    """
    root = Path(path).resolve()
    scan = SeriesScan()
    if root.is_file():
        scan.skipped.append(Skipped(str(root), "path", "expected a folder of slices, got a file"))
        return scan
    if not root.is_dir():
        reason = "no such folder"
        if os.path.lexists(root):  # a FIFO, socket or device: named, never opened
            try:
                check_regular_file(root, "path")
            except InputError as error:
                reason = error.reason
        scan.skipped.append(Skipped(str(root), "path", reason))
        return scan
    dicom_files: list[str] = []
    for folder, directories, names in os.walk(root):
        directories.sort(key=natural_key)
        files = []
        for name in sorted(names, key=natural_key):
            try:  # before anything opens it (a header check or the DICOM preamble): a FIFO would block
                check_regular_file(os.path.join(folder, name), "file")
            except InputError as error:
                scan.skipped.append(error.as_skipped())
                continue
            files.append(name)
        tiffs = [name for name in files if name.lower().endswith(TIFF_SUFFIXES)]
        if tiffs:
            _tiff_series(Path(folder), tiffs, shape, scan, check_headers)
        for name in sorted(set(files) - set(tiffs), key=natural_key):
            candidate = os.path.join(folder, name)
            if name.upper() != "DICOMDIR" and is_dicom(candidate):
                dicom_files.append(candidate)
    if dicom_files:
        _dicom_series(dicom_files, shape, scan)
    return scan


def read_dicom_ct_dir(root: str | os.PathLike, labels: Mapping[str, float] | None = None,
                      shape: tuple[int, int] = SLICE_SHAPE) -> ReadResult:
    """Every DICOM CT series under ``root`` as slice Samples (headers only).

    ``patient_id`` = PatientID, ``series_id`` = SeriesInstanceUID, ``slice_index`` = position
    in the series order, ``image_id`` = SOPInstanceUID; ``labels`` is given to every slice.
    """
    scan = find_ct_series(root, shape)
    result = ReadResult(skipped=list(scan.skipped))
    candidates = []
    for series in scan.series:
        if series.kind != "dicom":
            continue
        for index, (path, image_id) in enumerate(zip(series.paths, series.image_ids)):
            candidates.append(Sample(
                image_id=image_id, patient_id=series.patient_id, source=DICOM_SOURCE, path=path,
                labels=dict(labels or {}), bit_depth=16, study_id=series.study_id,
                series_id=series.series_id, slice_index=index,
            ))
    result.samples = check_unique_ids(candidates, result)
    return result

