"""Image file formats without decoding: signatures, header sizes, completeness, the pixel limit.

This is the reading side's leaf: it imports neither OpenCV nor TensorFlow nor pydicom, so
``caaxr_tf.predict``, the DICOM reader and the source readers can check files cheaply. Decoding
and re-encoding (OpenCV) live in ``caaxr_tf.data.images``, the writer side.

Two rules hold for every path that reads an image (TFRecord staging, evaluation through the
records, ``caaxr_tf.predict`` and the exported serving graph):

* Pixels are used as stored: an EXIF orientation tag is ignored (TensorFlow's ``decode_jpeg``
  ignores it and a SavedModel cannot apply it).
* An image larger than ``MAX_IMAGE_PIXELS`` is reported and left out before it is decoded; its
  size is read from the file header (PNG IHDR, JPEG SOF, TIFF directory, DICOM Rows x Columns).
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from caaxr_tf.data.records import InputError, check_regular_file  # noqa: F401  (check_regular_file: moved to records; re-exported)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
DICOM_SUFFIXES = (".dcm", ".dicom")
TIFF_SUFFIXES = (".tif", ".tiff")
# 100 megapixels, e.g. 10,000 x 10,000: 200 MB as 16-bit pixels, a few times that while a
# worker decodes and shrinks it. The largest digital X-ray detectors give about 20-40 MP
# (43 x 43 cm at 70-100 um), so real radiographs stay well below; anything larger is a
# mistake or a decompression bomb, and one such file must not take the machine's memory.
MAX_IMAGE_PIXELS = 100_000_000
# JPEG markers that start a frame (SOF0..SOF15) and carry the image size; C4 (DHT), C8 (JPG)
# and CC (DAC) share the range but are not frames.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}

# TIFF: byte order and BigTIFF flag by signature; the tags and field types the header check reads.
TIFF_MAGIC = {b"II*\x00": ("<", False), b"MM\x00*": (">", False),
              b"II+\x00": ("<", True), b"MM\x00+": (">", True)}
_TIFF_TYPES = {1: "B", 3: "H", 4: "I", 16: "Q"}  # BYTE, SHORT, LONG, LONG8
_TIFF_TAGS = {256: "width", 257: "height", 258: "bits", 259: "compression", 273: "strip_offsets",
              277: "samples", 279: "strip_bytes", 324: "tile_offsets", 325: "tile_bytes", 339: "sample_format"}


@dataclass
class LoadedImage:
    """Decoded grayscale pixels (H, W) as uint8 or uint16 and the bits they use.

    ``encoded``/``format`` hold the file's own bytes ("png" or "jpeg") when they already are
    what the records store — one grey channel of 8 or 16 bits that TensorFlow decodes to the
    same pixels — so the TFRecord builder can keep them instead of re-encoding.
    """

    pixels: np.ndarray
    bit_depth: int
    encoded: bytes | None = None
    format: str | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def is_dicom(path: str | os.PathLike) -> bool:
    """A ``.dcm``/``.dicom`` name, or the ``DICM`` marker after the 128-byte preamble."""
    path = os.fspath(path)
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGIC


# --- PNG / JPEG headers ------------------------------------------------------------------


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise EOFError
    return data


def _jpeg_segments(handle: BinaryIO):
    """Yield (marker, offset of the segment's payload, payload length) up to and including
    the first SOS (start of scan); ``handle`` is positioned after the SOI marker."""
    while True:
        byte = _read_exact(handle, 1)
        if byte != b"\xff":
            raise ValueError(f"expected a marker at byte {handle.tell() - 1}")
        marker = _read_exact(handle, 1)[0]
        while marker == 0xFF:  # fill bytes
            marker = _read_exact(handle, 1)[0]
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            raise ValueError("end-of-image marker before any scan")
        (length,) = struct.unpack(">H", _read_exact(handle, 2))
        if length < 2:
            raise ValueError(f"segment length {length} at byte {handle.tell() - 2}")
        yield marker, handle.tell(), length - 2
        if marker == 0xDA:
            return
        handle.seek(length - 2, os.SEEK_CUR)


def _jpeg_size(handle: BinaryIO) -> tuple[int, int] | None:
    for marker, offset, length in _jpeg_segments(handle):
        if marker in _JPEG_FRAME_MARKERS and length >= 5:
            handle.seek(offset + 1)  # sample precision, then height and width
            height, width = struct.unpack(">HH", _read_exact(handle, 4))
            return height, width
    return None


def image_size(source: str | os.PathLike | bytes) -> tuple[int, int] | None:
    """(height, width) of a PNG, JPEG or TIFF from its header, without decoding the pixels.

    ``source`` is a path or the file's bytes. Returns None when the header does not say
    (another format, or too short or malformed: decoding then reports the problem).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        handle: BinaryIO = io.BytesIO(bytes(source))
    else:
        try:
            handle = open(os.fspath(source), "rb")
        except OSError:
            return None
    with handle:
        try:
            start = handle.read(8)
            if start == PNG_SIGNATURE:
                chunk = handle.read(16)  # IHDR: length, type, width, height
                if len(chunk) < 16 or chunk[4:8] != b"IHDR":
                    return None
                width, height = struct.unpack(">II", chunk[8:16])
                return height, width
            if start.startswith(JPEG_SOI):
                handle.seek(2)
                return _jpeg_size(handle)
            if start[:4] in TIFF_MAGIC:
                handle.seek(0)
                info = _tiff_info(handle, "<bytes>")
                return info.height, info.width
        except (EOFError, ValueError, struct.error, InputError):
            return None
    return None


def check_pixel_limit(path: str, height: int, width: int, limit: int = MAX_IMAGE_PIXELS) -> None:
    """Raise InputError for an image of more than ``limit`` pixels (checked before decoding)."""
    if height * width > limit:
        raise InputError(
            path, "image",
            f"{width}x{height} pixels ({height * width / 1e6:.1f} MP) exceed the limit of "
            f"{limit / 1e6:g} MP; left out without decoding",
        )


def _jpeg_is_complete(data: bytes) -> bool:
    """True when an end-of-image marker follows the first scan; bytes after it are allowed.

    The segments before the scan are skipped by their lengths, so the end marker of an EXIF
    thumbnail does not count; inside entropy-coded data 0xFF is always followed by 0x00 or
    a restart marker, so ``FF D9`` there is the real end.
    """
    handle = io.BytesIO(data)
    handle.seek(2)
    try:
        for marker, offset, length in _jpeg_segments(handle):
            if marker == 0xDA:
                return data.find(b"\xff\xd9", offset + length) >= 0
    except (EOFError, ValueError, struct.error):
        return False
    return False


def check_complete(path: str, data: bytes) -> None:
    """Raise InputError for empty or visibly truncated PNG/JPEG/TIFF bytes.

    OpenCV decodes a truncated JPEG without failing (it fills the rest with grey), so the
    end markers are checked explicitly; a TIFF's image data must end inside the file.
    """
    if not data:
        raise InputError(path, "image", "file is empty (0 bytes)")
    if data.startswith(PNG_SIGNATURE):
        if data.rfind(b"IEND") < 0:
            raise InputError(path, "image", "truncated PNG (no IEND chunk)")
    elif data.startswith(JPEG_SOI):
        if not _jpeg_is_complete(data):
            raise InputError(path, "image", "truncated JPEG (no end-of-image marker after the image data)")
    elif is_tiff(data):
        read_tiff_info(data, path)
    else:
        raise InputError(path, "image", "not a PNG, JPEG or TIFF file (unknown signature)")


def stores_plain_grey(data: bytes) -> bool:
    """True for a greyscale PNG of 8/16 bits, or a JPEG (the caller checked it is grey):
    bytes the records can keep as they are.

    Low-bit PNGs are widened differently by decoders, so those are re-encoded from the
    decoded pixels; TIFF is not decoded by TensorFlow, so it is always re-encoded.
    """
    if data.startswith(PNG_SIGNATURE):
        # IHDR is always the first chunk: bit depth at byte 24, colour type at byte 25
        return len(data) > 25 and data[12:16] == b"IHDR" and data[24] in (8, 16) and data[25] == 0
    return data.startswith(JPEG_SOI)


# --- TIFF headers ------------------------------------------------------------------------


@dataclass(frozen=True)
class TiffInfo:
    """What the first image directory of a TIFF file says (nothing is decoded)."""

    width: int
    height: int
    bits: int
    samples: int
    sample_format: int
    compression: int


def read_tiff_info(source: str | os.PathLike | bytes, path: str | None = None) -> TiffInfo:
    """Parse the header and first IFD of a TIFF file (a path, or its bytes with ``path`` naming
    it in errors) and check that its image data is all there.

    Raises:
        InputError: not a TIFF file (``file``), a broken directory or a second one (``IFD``:
            a multi-page file, whose first page alone decoders would read), or image data
            past the end of the file (``StripByteCounts``/``TileByteCounts``: truncated).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _tiff_info(io.BytesIO(bytes(source)), path or "<bytes>")
    name = os.fspath(source)
    try:
        with open(name, "rb") as handle:
            return _tiff_info(handle, name)
    except OSError as error:
        raise InputError(name, "file", f"cannot be read ({error.strerror or error})") from error


def _tiff_info(handle: BinaryIO, path: str) -> TiffInfo:
    data = handle.read(1 << 16)
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    magic = data[:4]
    if magic not in TIFF_MAGIC:
        raise InputError(path, "file", "not a TIFF file (unknown signature)")
    order, big = TIFF_MAGIC[magic]
    values = _read_ifd(path, handle, data, order, big, size)
    for tag, name in ((256, "ImageWidth"), (257, "ImageLength")):
        if not values.get(_TIFF_TAGS[tag]):
            raise InputError(path, name, "missing from the TIFF directory")
    offsets = values.get("strip_offsets") or values.get("tile_offsets") or []
    counts = values.get("strip_bytes") or values.get("tile_bytes") or []
    field_name = "TileByteCounts" if values.get("tile_offsets") else "StripByteCounts"
    if not offsets or len(offsets) != len(counts):
        raise InputError(path, field_name, "image data offsets/byte counts missing or inconsistent")
    end = max(offset + count for offset, count in zip(offsets, counts))
    if end > size:
        raise InputError(path, field_name, f"truncated: image data ends at byte {end}, file has {size}")
    bits = values.get("bits") or [1]
    return TiffInfo(
        width=values["width"][0], height=values["height"][0], bits=int(bits[0]),
        samples=(values.get("samples") or [1])[0], sample_format=(values.get("sample_format") or [1])[0],
        compression=(values.get("compression") or [1])[0],
    )


def _read_ifd(path: str, handle: BinaryIO, data: bytes, order: str, big: bool, size: int) -> dict[str, list[int]]:
    def read(offset: int, length: int) -> bytes:
        if offset + length <= len(data):
            return data[offset:offset + length]
        handle.seek(offset)
        chunk = handle.read(length)
        if len(chunk) != length:
            raise InputError(path, "IFD", f"truncated: directory data past the end of the file ({size} bytes)")
        return chunk

    if big:
        offset = struct.unpack(order + "Q", read(8, 8))[0]
        count_format, entry_size, inline = "Q", 20, 8
    else:
        offset = struct.unpack(order + "I", read(4, 4))[0]
        count_format, entry_size, inline = "H", 12, 4
    if not 8 <= offset < size:
        raise InputError(path, "IFD", f"first directory offset {offset} outside the file ({size} bytes)")
    count_size = struct.calcsize(count_format)
    entries = struct.unpack(order + count_format, read(offset, count_size))[0]
    if entries == 0 or entries > 4096:
        raise InputError(path, "IFD", f"implausible number of directory entries ({entries})")
    table = read(offset + count_size, entries * entry_size)
    values: dict[str, list[int]] = {}
    for index in range(entries):
        entry = table[index * entry_size:(index + 1) * entry_size]
        if big:
            tag, kind, count = struct.unpack(order + "HHQ", entry[:12])
        else:
            tag, kind, count = struct.unpack(order + "HHI", entry[:8])
        if tag not in _TIFF_TAGS or kind not in _TIFF_TYPES:
            continue
        item = _TIFF_TYPES[kind]
        length = count * struct.calcsize(item)
        if length <= inline:
            raw = entry[entry_size - inline:entry_size - inline + length]
        else:
            pointer = struct.unpack(order + ("Q" if big else "I"), entry[entry_size - inline:])[0]
            raw = read(pointer, length)
        values[_TIFF_TAGS[tag]] = list(struct.unpack(order + item * count, raw))
    position = offset + count_size + entries * entry_size  # where the next directory's offset is
    next_offset = 0
    if position + inline <= size:  # (a writer that left it out wrote one directory)
        next_offset = struct.unpack(order + ("Q" if big else "I"), read(position, inline))[0]
    if next_offset:
        # decoders read the first image only: a stack of slices, or a thumbnail before the image,
        # would be used as that first page without a word
        raise InputError(path, "IFD", f"multi-page TIFF (a second image directory at byte {next_offset}); "
                         "only single-image files are read")
    return values
