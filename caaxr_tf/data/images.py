"""Decoding and re-encoding images with OpenCV: the writer side (TFRecord staging, masks).

File checks that need no decoding (signatures, header sizes, completeness, the pixel limit,
``LoadedImage``) live in ``caaxr_tf.data.formats``, which the reading side (predict, the DICOM
reader, the source readers) imports without OpenCV. The rules of that module hold here too:
pixels are used as stored (an EXIF orientation is ignored, ``IMREAD_IGNORE_ORIENTATION``) and
an image over ``MAX_IMAGE_PIXELS`` is refused before it is decoded.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from caaxr_tf.data.formats import (
    PNG_SIGNATURE,
    LoadedImage,
    check_complete,
    check_pixel_limit,
    check_regular_file,
    image_size,
    is_dicom,
    stores_plain_grey,
)
from caaxr_tf.data.records import InputError

DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION


def decode_image_bytes(path: str, data: bytes) -> LoadedImage:
    """Decode PNG/JPEG/TIFF bytes to one grayscale channel, keeping 16-bit data as uint16.

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
    reusable = pixels.ndim == 2 and stores_plain_grey(data)
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


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Load any supported file (PNG, JPEG, TIFF or DICOM) as grayscale pixels."""
    path = os.fspath(path)
    check_regular_file(path)
    if is_dicom(path):
        # here, not at the top: pydicom costs a staging worker's start-up 0.15 s of its 0.3 s
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


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A boolean ``[H, W]`` mask at ``height x width`` as uint8 0/255, by nearest neighbour (it
    stays binary): the mask of an image that ``resize_long_side`` brought to that size."""
    pixels = np.where(mask, np.uint8(255), np.uint8(0))
    if pixels.shape[:2] == (height, width):
        return pixels
    return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_NEAREST)


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
