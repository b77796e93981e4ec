"""Reading and checking binary ground-truth masks (infection masks, lung masks).

A mask file is *binary* when every pixel is 0 or the foreground level: 255 for 8-bit files,
65535 for 16-bit files, or 1 in files whose values never exceed 1 (masks saved as 0/1).
Real masks are not always that clean: resampled or anti-aliased edges leave a few in-between
values (7 of the 209 lungVAE masks of covid-chestxray have such values on up to 0.11 % of their
pixels). Up to ``max_gray_fraction`` of the pixels (default 1 %) may hold other values; they
are binarised at half the foreground level (``>= 128`` for 8-bit masks). A mask with more is
"not binary" and rejected, naming the file.

`read_binary_mask` is the one place that turns a mask file into a boolean array: readers use
it to check masks, and the record writers to encode them, so both see the same pixels.
"""

from __future__ import annotations

import os

import numpy as np

from caaxr_tf.data.images import load_image
from caaxr_tf.data.records import InputError

MAX_GRAY_FRACTION = 0.01
MASK_FIELD = "mask"


def _foreground_level(pixels: np.ndarray) -> int:
    if int(pixels.max(initial=0)) <= 1:
        return 1
    return 255 if pixels.dtype == np.uint8 else 65535


def read_binary_mask(path: str | os.PathLike, max_gray_fraction: float = MAX_GRAY_FRACTION) -> np.ndarray:
    """The mask at ``path`` as a boolean ``[H, W]`` array (colour files are read as grey).

    Raises:
        InputError: field ``"mask"``: the file is missing, unreadable, truncated or not
            binary (more than ``max_gray_fraction`` of its pixels are neither 0 nor the
            foreground level).
    """
    path = os.fspath(path)
    try:
        pixels = load_image(path).pixels
    except InputError as error:
        raise InputError(path, MASK_FIELD, error.reason) from error
    level = _foreground_level(pixels)
    gray = (pixels != 0) & (pixels != level)
    gray_count = int(np.count_nonzero(gray))
    if gray_count > max_gray_fraction * pixels.size:
        examples = ", ".join(str(v) for v in np.unique(pixels[gray])[:5])
        raise InputError(
            path,
            MASK_FIELD,
            f"not binary: {gray_count} of {pixels.size} pixels ({100.0 * gray_count / pixels.size:.2f} %) "
            f"are neither 0 nor {level} (e.g. {examples}); at most {100.0 * max_gray_fraction:g} % are tolerated",
        )
    return pixels >= (level + 1) // 2


def check_same_size(mask_path: str, mask: np.ndarray, image_path: str, image_shape: tuple[int, ...]) -> None:
    """Raise ``InputError`` (on the mask, field ``"mask"``) when mask and image sizes differ."""
    if tuple(mask.shape[:2]) != tuple(image_shape[:2]):
        height, width = mask.shape[:2]
        image_height, image_width = image_shape[:2]
        raise InputError(
            mask_path,
            MASK_FIELD,
            f"mask is {width}x{height} but its image {os.path.basename(image_path)} is {image_width}x{image_height}",
        )
