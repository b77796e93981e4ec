"""Reading, checking and re-encoding image files (PNG 8/16-bit, JPEG, DICOM)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from caaxr_tf.data.records import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
DICOM_SUFFIXES = (".dcm", ".dicom")


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
        if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
            raise InputError(path, "image", "truncated JPEG (no end-of-image marker)")
    else:
        raise InputError(path, "image", "not a PNG or JPEG file (unknown signature)")


def decode_image_bytes(path: str, data: bytes) -> LoadedImage:
    """Decode PNG/JPEG bytes to one grayscale channel, keeping 16-bit data as uint16."""
    check_complete(path, data)
    buffer = np.frombuffer(data, dtype=np.uint8)
    pixels = cv2.imdecode(buffer, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
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
    """True for a greyscale PNG of 8/16 bits, or a JPEG without EXIF data.

    Low-bit PNGs are widened differently by decoders, and OpenCV applies an EXIF
    orientation that TensorFlow ignores, so those are re-encoded from the decoded pixels.
    """
    if data.startswith(PNG_SIGNATURE):
        # IHDR is always the first chunk: bit depth at byte 24, colour type at byte 25
        return len(data) > 25 and data[12:16] == b"IHDR" and data[24] in (8, 16) and data[25] == 0
    return b"Exif\x00\x00" not in data[:65536]


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Load any supported file (PNG, JPEG or DICOM) as grayscale pixels."""
    path = os.fspath(path)
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
