"""Reading, checking and re-encoding image files (PNG 8/16-bit, JPEG, DICOM).

Two rules hold for every path that reads an image (TFRecord staging, evaluation through the
records, ``caaxr_tf.predict`` and the exported serving graph):

* Pixels are used as stored: an EXIF orientation tag is ignored. TensorFlow's
  ``decode_jpeg`` (serving, tf.data) ignores it and a SavedModel cannot apply it, so OpenCV is
  told to ignore it too (``IMREAD_IGNORE_ORIENTATION``).
* An image larger than ``MAX_IMAGE_PIXELS`` is reported and left out before it is decoded; its
  size is read from the file header (PNG IHDR, JPEG SOF, DICOM Rows x Columns).
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

import cv2
import numpy as np

from caaxr_tf.data.records import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
DICOM_SUFFIXES = (".dcm", ".dicom")
# 100 megapixels, e.g. 10,000 x 10,000: 200 MB as 16-bit pixels, a few times that while a
# worker decodes and shrinks it. The largest digital X-ray detectors give about 20-40 MP
# (43 x 43 cm at 70-100 um), so real radiographs stay well below; anything larger is a
# mistake or a decompression bomb, and one such file must not take the machine's memory.
MAX_IMAGE_PIXELS = 100_000_000
DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION
# JPEG markers that start a frame (SOF0..SOF15) and carry the image size; C4 (DHT), C8 (JPG)
# and CC (DAC) share the range but are not frames.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}


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


def is_dicom(path: str) -> bool:
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


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
    """(height, width) of a PNG or JPEG from its header, without decoding the pixels.

    ``source`` is a path or the file's bytes. Returns None when the header does not say
    (not PNG/JPEG, or too short or malformed: decoding then reports the problem).
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
        except (EOFError, ValueError, struct.error):
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
    """Raise InputError for empty or visibly truncated PNG/JPEG bytes.

    OpenCV decodes a truncated JPEG without failing (it fills the rest with grey), so the
    end markers are checked explicitly.
    """
    if not data:
        raise InputError(path, "image", "file is empty (0 bytes)")
    if data.startswith(PNG_SIGNATURE):
        if data.rfind(b"IEND") < 0:
            raise InputError(path, "image", "truncated PNG (no IEND chunk)")
    elif data.startswith(JPEG_SOI):
        if not _jpeg_is_complete(data):
            raise InputError(path, "image", "truncated JPEG (no end-of-image marker after the image data)")
    else:
        raise InputError(path, "image", "not a PNG or JPEG file (unknown signature)")


def decode_image_bytes(path: str, data: bytes) -> LoadedImage:
    """Decode PNG/JPEG bytes to one grayscale channel, keeping 16-bit data as uint16.

    Pixels come out as stored (EXIF orientation ignored); images over ``MAX_IMAGE_PIXELS``
    raise InputError before decoding.
    """
    check_complete(path, data)
    size = image_size(data)
    if size is not None:
        check_pixel_limit(path, *size)
    buffer = np.frombuffer(data, dtype=np.uint8)
    pixels = cv2.imdecode(buffer, DECODE_FLAGS)
    if pixels is None or pixels.size == 0:
        raise InputError(path, "image", "could not be decoded (corrupt image data)")
    reusable = pixels.ndim == 2 and _stores_plain_grey(data)
    if pixels.ndim == 3:
        channels = pixels.shape[2]
        if channels == 4:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY)
        elif channels == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
        else:
            pixels = pixels[..., 0]
    if pixels.dtype == np.uint8:
        bit_depth = 8
    elif pixels.dtype == np.uint16:
        bit_depth = 16
    else:
        raise InputError(path, "image", f"unsupported pixel type {pixels.dtype}")
    if not reusable:
        return LoadedImage(np.ascontiguousarray(pixels), bit_depth)
    return LoadedImage(np.ascontiguousarray(pixels), bit_depth, data, "png" if data.startswith(PNG_SIGNATURE) else "jpeg")


def _stores_plain_grey(data: bytes) -> bool:
    """True for a greyscale PNG of 8/16 bits, or a JPEG (the caller checked it is grey).

    Low-bit PNGs are widened differently by decoders, so those are re-encoded from the
    decoded pixels. An EXIF orientation no longer matters: every path ignores it.
    """
    if data.startswith(PNG_SIGNATURE):
        # IHDR is always the first chunk: bit depth at byte 24, colour type at byte 25
        return len(data) > 25 and data[12:16] == b"IHDR" and data[24] in (8, 16) and data[25] == 0
    return True


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Load any supported file (PNG, JPEG or DICOM) as grayscale pixels."""
    path = os.fspath(path)
    check_regular_file(path)
    if is_dicom(path):
        from caaxr_tf.data.dicom import read_dicom

        return read_dicom(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise InputError(path, "image", f"cannot be read ({error.strerror or error})") from error
    return decode_image_bytes(path, data)


def resize_long_side(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the long side is at most ``max_side`` (area interpolation); 0 keeps the size."""
    height, width = pixels.shape[:2]
    long_side = max(height, width)
    if max_side <= 0 or long_side <= max_side:
        return pixels
    scale = max_side / long_side
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def _png_parameters(compression: int) -> list[int]:
    # The "up" filter with run-length zlib: about a third less CPU than OpenCV's adaptive
    # filters with default zlib on X-rays, with smaller files (docs/BENCHMARKS.md). Both the
    # encoder and, later, tf.data's decoder get cheaper.
    parameters = [cv2.IMWRITE_PNG_COMPRESSION, compression, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # not in every OpenCV build
        parameters += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    return parameters


def encode_png(pixels: np.ndarray, compression: int = 1) -> bytes:
    """PNG-encode uint8/uint16 grayscale pixels; the same pixels always give the same bytes."""
    ok, encoded = cv2.imencode(".png", pixels, _png_parameters(compression))
    if not ok:
        raise ValueError("PNG encoding failed")
    return encoded.tobytes()
