"""DICOM X-rays: pixels ready for display as 16-bit grayscale, and a reader for DICOM folders.

``read_dicom`` applies the standard grayscale pipeline (PS3.3 C.11):

1. Modality LUT: Rescale Slope/Intercept, or the Modality LUT Sequence.
2. VOI LUT: the first VOI LUT Sequence item if present (pydicom's default preference),
   else the first Window Center/Width with its VOI LUT Function (LINEAR, LINEAR_EXACT,
   SIGMOID).
3. MONOCHROME1 is inverted, so that bright always means dense.

The output is uint16 spanning 0..65535 (``bit_depth`` 16). How the range is picked:

* With a VOI LUT or window, its output range maps onto 0..65535 (window bottom -> 0, window
  top -> 65535; a VOI LUT's ``0 .. 2**bits - 1`` from its descriptor -> 0..65535).
* Without one, the range of values the file can hold maps onto 0..65535: the stored range
  given by Bits Stored and Pixel Representation, passed through the modality LUT. This does
  not depend on the image content (no per-image min/max stretch), in the same way the BIMCV
  PNGs are scaled by their Bits Stored.

Multi-frame files give their first frame.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder

from caaxr_tf.data.formats import MAX_IMAGE_PIXELS, LoadedImage, check_regular_file, is_dicom
from caaxr_tf.data.records import InputError, ReadResult, Sample, check_unique_ids

SOURCE = "dicom"
OUTPUT_MAX = 65535
FRONTAL_VIEWS = ("ap", "pa")
EXCLUDED_VIEW = "non-frontal view"
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
# A Modality LUT Sequence is applied to every value the file can store to find the output
# range; beyond 16 stored bits that table would not fit in memory (2**32 values: 32 GiB).
MAX_LUT_STORED_BITS = 16


def _pip_hint(dependency: str) -> str:
    """``'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0'`` -> a pip command."""
    _, _, requires = dependency.partition(" - requires ")
    names = [re.split(r"[<>=! ]", part.strip())[0] for part in requires.split(" and ")]
    names = [name for name in names if name and name != "numpy"]
    names = ["python-gdcm" if name == "gdcm" else name for name in names]  # gdcm's pip name
    return f"pip install {' '.join(names)}" if names else dependency


def read_dataset(path: str | os.PathLike, pixels: bool = True) -> Dataset:
    """Open a DICOM file; ``pixels=False`` defers reading the pixel data (header only)."""
    path = os.fspath(path)
    try:
        if pixels:
            return pydicom.dcmread(path)
        return pydicom.dcmread(path, defer_size="4 KB")
    except InvalidDicomError as error:
        raise InputError(path, "file", f"not a DICOM file ({error})") from error
    except OSError as error:
        raise InputError(path, "file", f"cannot be read ({error.strerror or error})") from error
    except Exception as error:  # pydicom raises many types on corrupt headers
        reason = f"cannot be parsed as DICOM ({type(error).__name__}: {error})"
        raise InputError(path, "file", reason) from error


def check_pixel_data(path: str, ds: Dataset) -> None:
    """Raise InputError unless ``ds`` has grayscale pixel data that an installed decoder reads."""
    if "PixelData" not in ds:
        raise InputError(path, "PixelData", "no pixel data in the file")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        reason = f"expected MONOCHROME1 or MONOCHROME2, found {photometric or 'none'!r}"
        raise InputError(path, "PhotometricInterpretation", reason)
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        raise InputError(path, "Rows/Columns", f"not numbers ({ds.get('Rows')!r}, {ds.get('Columns')!r})") from None
    if rows * columns > MAX_IMAGE_PIXELS:
        raise InputError(
            path, "Rows/Columns",
            f"{columns}x{rows} pixels ({rows * columns / 1e6:.1f} MP) exceed the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:g} MP; left out without decoding",
        )
    if "ModalityLUTSequence" not in ds and ds.get("RescaleSlope") not in (None, ""):
        try:
            slope = float(ds.RescaleSlope)
        except (TypeError, ValueError):
            raise InputError(path, "RescaleSlope", f"not a number ({ds.RescaleSlope!r})") from None
        if slope == 0 or not np.isfinite(slope):
            raise InputError(path, "RescaleSlope", f"{slope:g}: every pixel would become RescaleIntercept "
                             "(a blank image)")
    if "ModalityLUTSequence" in ds:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
        if bits > MAX_LUT_STORED_BITS:
            raise InputError(
                path, "ModalityLUTSequence",
                f"a Modality LUT Sequence with BitsStored {bits} is not supported "
                f"(at most {MAX_LUT_STORED_BITS} bits)",
            )
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        raise InputError(path, "TransferSyntaxUID", "missing from the file meta information")
    if not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as error:
        reason = f"{uid.name} ({uid}) is not supported by pydicom"
        raise InputError(path, "TransferSyntaxUID", reason) from error
    if not decoder.is_available:
        options = "; ".join(_pip_hint(dep) for dep in decoder.missing_dependencies) or "none known"
        raise InputError(
            path,
            "TransferSyntaxUID",
            f"{uid.name} ({uid}) is compressed and no decoder for it is installed; "
            f"any one of these would decode it: {options}",
        )


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _number(path: str, ds: Dataset, keyword: str) -> float:
    value = ds.get(keyword)
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(path, keyword, f"not a number ({value!r})") from None
    if not np.isfinite(number):
        raise InputError(path, keyword, f"not finite ({number})")
    return number


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a VOI window (PS3.3 C.11.2.1.2); returns floats in 0..1."""
    function = function.strip().upper() or "LINEAR"
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"width must be >= 1 for LINEAR, got {width:g}")
        if width == 1:  # the standard's limit case: a threshold at center - 0.5
            return (values > center - 0.5).astype(np.float64)
        scaled = (values - (center - 0.5)) / (width - 1) + 0.5
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"width must be > 0 for LINEAR_EXACT, got {width:g}")
        scaled = (values - center) / width + 0.5
    elif function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"width must be > 0 for SIGMOID, got {width:g}")
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    else:
        raise ValueError(f"unknown VOI LUT function {function!r}; expected one of {VOI_FUNCTIONS}")
    return np.clip(scaled, 0.0, 1.0)


def _lut_table(ds: Dataset, item: Dataset) -> tuple[np.ndarray, int, int]:
    """(table, first mapped value, bits per entry) of one VOI LUT Sequence item."""
    entries, first, bits = (int(value) for value in item.LUTDescriptor)
    entries = entries or 65536  # 0 means 2**16 entries
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # OW: raw 16-bit words
        little = ds.file_meta.TransferSyntaxUID.is_little_endian
        table = np.frombuffer(data, dtype="<u2" if little else ">u2")
    else:
        table = np.atleast_1d(np.asarray(data))
    if len(table) < entries:
        raise ValueError(f"LUTData has {len(table)} entries, LUTDescriptor says {entries}")
    if not 1 <= bits <= 16:
        raise ValueError(f"LUTDescriptor gives {bits} bits per entry")
    return table[:entries].astype(np.float64), first, bits


def _voi(path: str, ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """VOI output scaled to 0..1, or None when the file has neither a VOI LUT nor a window."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        try:
            lut, first, bits = _lut_table(ds, sequence[0])
        except (AttributeError, IndexError, TypeError, ValueError) as error:
            raise InputError(path, "VOILUTSequence", f"cannot be read ({error})") from error
        index = np.clip(np.rint(values) - first, 0, len(lut) - 1).astype(np.int64)
        return np.clip(lut[index] / float(2**bits - 1), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = _number(path, ds, "WindowCenter")
        width = _number(path, ds, "WindowWidth")
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        if function not in VOI_FUNCTIONS:
            reason = f"expected one of {', '.join(VOI_FUNCTIONS)}, found {function!r}"
            raise InputError(path, "VOILUTFunction", reason)
        try:
            return window(values, center, width, function)
        except ValueError as error:
            raise InputError(path, "WindowWidth", str(error)) from error
    return None


def dataset_to_pixels(path: str, ds: Dataset) -> np.ndarray:
    """Decode and transform ``ds`` into uint16 display pixels (see the module docstring)."""
    check_pixel_data(path, ds)
    uid = ds.file_meta.TransferSyntaxUID
    try:
        stored = ds.pixel_array
    except Exception as error:  # decoders raise many types on bad data
        reason = f"cannot be decoded as {uid.name} ({uid}): {type(error).__name__}: {error}"
        raise InputError(path, "PixelData", reason) from error
    if stored.ndim == 3:
        stored = stored[0]
    if stored.ndim != 2 or stored.size == 0:
        reason = f"expected one grayscale frame, got shape {stored.shape}"
        raise InputError(path, "PixelData", reason)

    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        low, high = _stored_range(ds)
        ends = np.arange(low, high + 1) if "ModalityLUTSequence" in ds else np.array([low, high])
        ends = np.asarray(apply_modality_lut(ends, ds), dtype=np.float64)
    except Exception as error:
        field = "ModalityLUTSequence" if "ModalityLUTSequence" in ds else "RescaleSlope"
        raise InputError(path, field, f"modality LUT cannot be applied ({error})") from error

    scaled = _voi(path, ds, values)
    if scaled is None:
        out_low, out_high = float(ends.min()), float(ends.max())
        if out_high > out_low:
            scaled = np.clip((values - out_low) / (out_high - out_low), 0.0, 1.0)
        else:
            scaled = np.zeros_like(values)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.rint(scaled * OUTPUT_MAX).astype(np.uint16)


def read_dicom(path: str | os.PathLike) -> LoadedImage:
    """Read a DICOM X-ray as uint16 pixels over the full 0..65535 range (bit depth 16).

    Raises:
        InputError: naming the file and the field (``file``, ``PixelData``,
            ``TransferSyntaxUID``, ``PhotometricInterpretation``, ``WindowWidth``...).
    """
    path = os.fspath(path)
    check_regular_file(path, "file")
    ds = read_dataset(path, pixels=False)
    check_pixel_data(path, ds)  # size and LUT limits before the pixel data is read
    return LoadedImage(dataset_to_pixels(path, ds), 16)


def read_dicom_dir(
    root: str | os.PathLike,
    labels: Mapping[str, float] | None = None,
    frontal_views: Sequence[str] = FRONTAL_VIEWS,
) -> ReadResult:
    """Read every DICOM file under ``root`` (headers only) into Samples.

    Args:
        root: searched recursively; ``.dcm``/``.dicom`` files and files with the ``DICM``
            preamble count. ``DICOMDIR`` index files are left out.
        labels: given to every sample (e.g. ``{"COVID-19": 1.0}`` for a positive folder).
        frontal_views: kept ViewPosition values (lower case); a file without ViewPosition is
            kept, one with another view is counted in ``excluded``.

    Patient id = PatientID (required), image id = SOPInstanceUID (else the file stem),
    study id = StudyInstanceUID, view = ViewPosition in lower case. Files that are unreadable,
    lack pixel data or need a decoder that is not installed are reported in ``skipped``.
    """
    frontal = {view.strip().lower() for view in frontal_views}
    result = ReadResult()
    candidates: list[Sample] = []
    files = sorted(
        (p for p in Path(root).resolve().rglob("*") if p.is_file()), key=lambda p: p.as_posix()
    )
    for file in files:
        if file.name.upper() == "DICOMDIR":
            result.exclude("DICOMDIR index")
            continue
        if not is_dicom(str(file)):
            continue
        path = str(file)
        try:
            ds = read_dataset(path, pixels=False)
            check_pixel_data(path, ds)
        except InputError as error:
            result.skipped.append(error.as_skipped())
            continue
        view = str(ds.get("ViewPosition", "") or "").strip().lower()
        if view and view not in frontal:
            result.exclude(EXCLUDED_VIEW)
            continue
        patient = str(ds.get("PatientID", "") or "").strip()
        if not patient:
            result.skip(path, "PatientID", "missing or empty")
            continue
        candidates.append(
            Sample(
                image_id=str(ds.get("SOPInstanceUID", "") or "").strip() or file.stem,
                patient_id=patient,
                source=SOURCE,
                path=path,
                labels=dict(labels or {}),
                view=view,
                study_id=str(ds.get("StudyInstanceUID", "") or "").strip(),
            )
        )
    result.samples = check_unique_ids(candidates, result)
    return result
