"""The common sample record every reader yields, and how bad input is reported.

Each source reader (BIMCV, CAAXR, CheXpert, covid-chestxray, DICOM) turns its own layout into
``Sample`` records and a list of ``Skipped`` inputs. Everything downstream (protocols,
TFRecord writing) only sees these records.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import pandas


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates of the original image.

    ``xmin``/``ymin`` are the top-left corner, ``xmax``/``ymax`` the bottom-right corner
    (exclusive), so ``width = xmax - xmin``.
    """

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    finding: str = "abnormality"

    @property
    def width(self) -> float:
        return self.xmax - self.xmin

    @property
    def height(self) -> float:
        return self.ymax - self.ymin


@dataclass(frozen=True)
class Sample:
    """One image and everything known about it, independent of its source.

    Attributes:
        image_id: unique id of the image within its source (e.g. the BIMCV file stem).
        patient_id: id of the subject; splits are grouped by it.
        source: ``bimcv``, ``chexpert``, ``covid-chestxray`` or ``dicom``.
        path: absolute path of the image file.
        labels: source observations as numbers (CheXpert: 1/0/-1 per observation, blank read as 0;
            BIMCV/CAAXR: ``{"COVID-19": 1.0}``).
        findings: study-level finding names (CAAXR study-level annotations,
            covid-chestxray ``finding`` tokens).
        boxes: annotated boxes (CAAXR abnormalities, covid-chestxray lungs).
        invert: the stored pixels must be contrast-inverted before use
            (BIMCV sidecar ``20500020`` == ``INVERSE``).
        bit_depth: bits stored per pixel when the source says so (BIMCV sidecar ``00280101``);
            ``None`` means: take it from the decoded image (8 or 16).
        view: view position, lower case (``pa``, ``ap``, ``ap supine``, ``ll``...).
        study_id: study or session id where the source has one.
        mask_path: absolute path of a pixel-level ground-truth mask (QaTa-COV19 infection
            masks, lungVAE lung masks); ``""`` when the source has none.
        series_id: the image series a slice belongs to (CT: one sequence of one patient).
        slice_index: position of a slice within its series (``-1`` for single images).
        demographics: patient metadata as the source gives it (covid-chestxray: ``sex``,
            ``age``), for the manifest and per-slice scoring only. Left out of ``repr`` (which the
            build fingerprint hashes) and of equality, so builds made before it stay valid.
    """

    image_id: str
    patient_id: str
    source: str
    path: str
    labels: dict[str, float] = field(default_factory=dict)
    findings: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()
    invert: bool = False
    bit_depth: int | None = None
    view: str = ""
    study_id: str = ""
    mask_path: str = ""
    series_id: str = ""
    slice_index: int = -1
    demographics: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def replace(self, **changes) -> "Sample":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Skipped:
    """An input that was left out, with the file and field that caused it."""

    path: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.field}: {self.reason}"

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "field": self.field, "reason": self.reason}


class InputError(ValueError):
    """Bad input in one file: names the file and the field."""

    def __init__(self, path: str, field: str, reason: str):
        super().__init__(f"{path}: {field}: {reason}")
        self.path = str(path)
        self.field = field
        self.reason = reason

    def as_skipped(self) -> Skipped:
        return Skipped(self.path, self.field, self.reason)


class SchemaError(InputError):
    """A file whose structure is wrong as a whole (e.g. a CSV without a required column).

    Unlike ``InputError`` this stops the run before anything is written.
    """


@dataclass
class ReadResult:
    """What a reader returns: the usable samples and every input it skipped."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # Inputs left out on purpose, not because they are bad (e.g. "lateral view": 47).
    excluded: dict[str, int] = field(default_factory=dict)
    # Inputs used but suspicious (e.g. an empty ground-truth mask), named like skipped ones.
    warnings: list[Skipped] = field(default_factory=list)

    def extend(self, other: "ReadResult") -> None:
        self.samples.extend(other.samples)
        self.skipped.extend(other.skipped)
        self.warnings.extend(other.warnings)
        for reason, count in other.excluded.items():
            self.exclude(reason, count)

    def exclude(self, reason: str, count: int = 1) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + count

    def skip(self, path: str, field_name: str, reason: str) -> None:
        self.skipped.append(Skipped(str(path), field_name, reason))

    def warn(self, path: str, field_name: str, reason: str) -> None:
        self.warnings.append(Skipped(str(path), field_name, reason))


def resolve_inside(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative`` when that names a place inside ``root``; ``ValueError`` otherwise.

    For paths read from data files (CSV cells, COCO ``file_name``, sidecars): an absolute
    path, or one whose ``..`` parts climb out of ``root``, would read files the data root
    does not hold, so it is refused. The check is on the path as written (symbolic links
    inside the root, e.g. an images folder on another disk, are followed as usual).
    """
    text = str(relative).strip()
    if not text:
        raise ValueError("empty path")
    if "\x00" in text:
        raise ValueError(f"path {text!r} contains a NUL byte")
    posix = text.replace("\\", "/")
    if posix.startswith("/") or os.path.isabs(text) or (len(posix) > 1 and posix[1] == ":"):
        raise ValueError(f"absolute path {text!r}: paths must be relative to {root}")
    normal = posixpath.normpath(posix)
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"path {text!r} points outside {root}")
    return Path(root) / normal


def check_unique_ids(samples: Iterable[Sample], result: ReadResult) -> list[Sample]:
    """Keep the first sample of each image id; report the others as duplicates."""
    seen: dict[str, str] = {}
    unique: list[Sample] = []
    for sample in samples:
        if sample.image_id in seen:
            result.skip(
                sample.path,
                "image_id",
                f"duplicate image id {sample.image_id!r} (first seen at {seen[sample.image_id]})",
            )
            continue
        seen[sample.image_id] = sample.path
        unique.append(sample)
    return unique


def read_csv_table(path: str | os.PathLike, required: Iterable[str] = ()) -> pandas.DataFrame:
    """Read a CSV file as text cells (blank cells are ``""``), checking its columns.

    Tries UTF-8 (a byte-order mark is dropped) and falls back to Latin-1 (public metadata
    files mix encodings). Column names are stripped of surrounding spaces. A missing or
    unreadable file, one that is not a regular file (a FIFO is never opened), or one lacking
    any of ``required``, raises ``SchemaError`` naming the file and the columns.
    Data row ``i`` of the returned frame is row ``i + 2`` of the file (header = row 1).
    """
    import pandas as pd


    path = str(path)
    try:
        if os.path.lexists(path):  # a missing file is reported below, as before
            check_regular_file(path, "file")  # before opening: a FIFO would block
    except InputError as error:
        raise SchemaError(path, error.field, error.reason) from None
    frame = None
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
            break
        except UnicodeDecodeError:
            continue
        except FileNotFoundError as error:
            raise SchemaError(path, "file", "not found") from error
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise SchemaError(path, "file", f"cannot be read as CSV ({error})") from error
    if frame is None:  # Latin-1 decodes any bytes, so this is only a guard
        raise SchemaError(path, "file", "cannot be decoded as UTF-8 or Latin-1")
    frame.columns = [str(name).strip() for name in frame.columns]
    missing = [name for name in required if name not in frame.columns]
    if missing:
        raise SchemaError(
            path, ", ".join(missing), f"required column(s) missing; found {list(frame.columns)}"
        )
    return frame.reset_index(drop=True)


def check_regular_file(path: str | os.PathLike, field: str = "image") -> None:
    """Raise InputError unless ``path`` is a regular file (following symbolic links).

    Called before a file is opened: opening a FIFO blocks until something writes to it, and
    devices or sockets are no images either.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(path, field, f"broken symbolic link (to {os.readlink(path)})") from None
        raise InputError(path, field, "file not found") from None
    except OSError as error:
        raise InputError(path, field, f"cannot be read ({error.strerror or error})") from error
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise InputError(path, field, f"not a regular file ({kind}); skipped")
