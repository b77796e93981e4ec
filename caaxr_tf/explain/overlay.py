"""CAM overlays in plain numpy, for the reading side (``caaxr_tf.predict``), which imports
neither OpenCV nor matplotlib.

    picture = cam_overlay_rgb(pixels, cam)       # uint8 [H, W, 3]
    png = encode_png(picture)                    # bytes, through tf.io.encode_png

The colours are matplotlib's ``jet`` (its segment data, interpolated linearly), blended with
the grey image as in `caaxr_tf.explain.plots.cam_overlay`; the peak is marked with a white
cross.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OVERLAY_ALPHA = 0.4
PEAK_ARM = 4  # pixels each side of the peak in the cross marker

# matplotlib's ``jet`` segment data: (position, value) for red, green and blue.
_JET = (
    ((0.0, 0.35, 0.66, 0.89, 1.0), (0.0, 0.0, 1.0, 1.0, 0.5)),
    ((0.0, 0.125, 0.375, 0.64, 0.91, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)),
    ((0.0, 0.11, 0.34, 0.65, 1.0), (0.5, 1.0, 1.0, 0.0, 0.0)),
)


def jet_rgb(values) -> np.ndarray:
    """float32 RGB in 0..1, [..., 3], of values in 0..1 (clipped) under the jet colour map."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(values, xs, ys) for xs, ys in _JET], axis=-1).astype(np.float32)


def grey_pixels(pixels) -> np.ndarray:
    """A grey image [H, W] or [H, W, 1] as float32 [H, W] clipped to 0..255."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise ValueError(f"an image must be [H, W] or [H, W, 1], got shape {pixels.shape}")
    return np.clip(pixels.astype(np.float32), 0.0, 255.0)


def peak_location(cam) -> dict[str, Any]:
    """The first maximum (row-major) of an [H, W] map: pixel ``x`` (column) and ``y`` (row),
    the pixel centre normalised to 0..1 and the value (as `caaxr_tf.explain.plots.cam_peak`)."""
    cam = np.asarray(cam)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"a map must be [H, W], got shape {cam.shape}")
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    height, width = cam.shape
    return {
        "x": int(x),
        "y": int(y),
        "x_norm": round(float((x + 0.5) / width), 6),
        "y_norm": round(float((y + 0.5) / height), 6),
        "value": round(float(cam[y, x]), 6),
    }


def cam_overlay_rgb(pixels, cam, alpha: float = OVERLAY_ALPHA, mark_peak: bool = True) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the grey image (0..255) blended with the jet colours of ``cam``
    (0..1, the image's size), the peak marked with a white cross."""
    grey = grey_pixels(pixels)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != grey.shape:
        raise ValueError(f"the map {cam.shape} must have the image's size {grey.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in 0..1, got {alpha}")
    blended = (1.0 - alpha) * grey[..., None] + alpha * 255.0 * jet_rgb(cam)
    overlay = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if mark_peak:
        peak = peak_location(cam)
        height, width = grey.shape
        x, y = peak["x"], peak["y"]
        overlay[y, max(x - PEAK_ARM, 0) : min(x + PEAK_ARM + 1, width)] = 255
        overlay[max(y - PEAK_ARM, 0) : min(y + PEAK_ARM + 1, height), x] = 255
    return overlay


def encode_png(picture: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] (or [H, W]) picture, with ``tf.io.encode_png``."""
    import tensorflow as tf

    picture = np.asarray(picture)
    if picture.dtype != np.uint8:
        raise ValueError(f"a picture must be uint8, got {picture.dtype}")
    if picture.ndim == 2:
        picture = picture[..., None]
    return tf.io.encode_png(picture).numpy()
