"""CAM pictures: one overlay PNG per image (predict) and a grid of images x classes (evaluate).

Overlays blend the grey image with the ``jet`` colour of the map:
``(1 - alpha) * grey + alpha * jet(cam)``, ``alpha`` = `OVERLAY_ALPHA`. Boxes (normalised
``xmin, ymin, xmax, ymax``) are outlined in green; the map's peak is marked with a white cross.
Files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from caaxr_tf.explain.overlay import grey_pixels, jet_rgb
from caaxr_tf.io import write_bytes_atomic

OVERLAY_ALPHA = 0.4
BOX_COLOUR = (0, 255, 0)  # RGB
PEAK_COLOUR = (255, 255, 255)
PEAK_MARKER_SIZE = 9


@dataclass(frozen=True)
class CamPeak:
    """Where a map is largest: pixel column ``x`` and row ``y`` (the first maximum in row-major
    order), the pixel centre normalised to 0..1 (``(x + 0.5) / W``, ``(y + 0.5) / H``), the value."""

    x: int
    y: int
    x_norm: float
    y_norm: float
    value: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "x": self.x,
            "y": self.y,
            "x_norm": round(self.x_norm, 6),
            "y_norm": round(self.y_norm, 6),
            "value": round(self.value, 6),
        }


def cam_peak(cam) -> CamPeak:
    """The peak of an [H, W] map (see `CamPeak`)."""
    cam = np.asarray(cam)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"a map must be [H, W], got shape {cam.shape}")
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    height, width = cam.shape
    return CamPeak(int(x), int(y), float((x + 0.5) / width), float((y + 0.5) / height), float(cam[y, x]))


def resize_map(cam, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an [h, w] map to [height, width] (half-pixel centres, as TF's)."""
    import cv2

    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape == (height, width):
        return cam
    return cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)


def jet_colours(cam) -> np.ndarray:
    """RGB float32 in 0..255 of a map in 0..1 under the ``jet`` colour map (`overlay.jet_rgb`)."""
    return 255.0 * jet_rgb(cam)


def cam_overlay(image, cam, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the grey image blended with the jet colours of ``cam`` (0..1),
    resized to the image when their sizes differ."""
    grey = grey_pixels(image)
    cam = resize_map(cam, *grey.shape)
    blended = (1.0 - alpha) * grey[..., None] + alpha * jet_colours(cam)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Normalised (xmin, ymin, xmax, ymax) -> the inclusive pixel rectangle (x0, y0, x1, y1)
    of the pixels whose centres are inside (as ``localization.boxes_to_mask``)."""
    xmin, ymin, xmax, ymax = (float(v) for v in box)
    x0 = int(np.ceil(xmin * width - 0.5))
    y0 = int(np.ceil(ymin * height - 0.5))
    x1 = int(np.ceil(xmax * width - 0.5)) - 1
    y1 = int(np.ceil(ymax * height - 0.5)) - 1
    return (max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1))


def render_cam_overlay(
    image, cam, boxes=None, alpha: float = OVERLAY_ALPHA, mark_peak: bool = True
) -> tuple[np.ndarray, CamPeak]:
    """The overlay of one image with its boxes and peak marked: (uint8 RGB [H, W, 3], peak).

    The peak is taken on the map resized to the image, so ``x``/``y`` are pixels of ``image``.
    """
    import cv2

    grey = grey_pixels(image)
    cam = resize_map(cam, *grey.shape)
    overlay = cam_overlay(grey, cam, alpha)
    height, width = grey.shape
    for box in np.asarray(boxes if boxes is not None else np.zeros((0, 4)), np.float64).reshape(-1, 4):
        x0, y0, x1, y1 = box_pixels(box, height, width)
        if x1 >= x0 and y1 >= y0:
            cv2.rectangle(overlay, (x0, y0), (x1, y1), BOX_COLOUR, 1)
    peak = cam_peak(cam)
    if mark_peak:
        cv2.drawMarker(overlay, (peak.x, peak.y), PEAK_COLOUR, cv2.MARKER_CROSS, PEAK_MARKER_SIZE, 1)
    return overlay, peak


def _write_bytes(path: str | Path, data: bytes) -> Path:
    return write_bytes_atomic(path, data)


def save_cam_overlay(
    image, cam, path: str | Path, boxes=None, alpha: float = OVERLAY_ALPHA
) -> CamPeak:
    """Write the overlay of `render_cam_overlay` as a PNG at ``path``; return the peak."""
    import cv2

    overlay, peak = render_cam_overlay(image, cam, boxes, alpha)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode the overlay for {path}")
    _write_bytes(path, encoded.tobytes())
    return peak


def plot_cam_grid(
    images,
    cams,
    path: str | Path,
    map_names: Sequence[str],
    boxes: Sequence[Any] | None = None,
    scores=None,
    ids: Sequence[str] | None = None,
    title: str = "",
    alpha: float = OVERLAY_ALPHA,
) -> Path:
    """A PNG grid: one row per image; the image (boxes outlined), then one CAM overlay per map.

    Args:
        images: [N, H, W] or [N, H, W, 1] grey images (0..255).
        cams: [N, K, h, w] maps in 0..1 (e.g. one per class), resized to the images.
        path: the PNG to write.
        map_names: K column titles (class names).
        boxes: per image a [B, 4] array of normalised boxes, or None.
        scores: [N, K] numbers shown in the titles (e.g. class probabilities), or None.
        ids: N row labels (image ids), or None.
    """
    from matplotlib.patches import Rectangle

    from caaxr_tf.plots import new_figure

    cams = np.asarray(cams)
    count = len(images)
    if cams.ndim != 4 or cams.shape[0] != count or cams.shape[1] != len(map_names):
        raise ValueError(
            f"cams must be [N={count}, K={len(map_names)}, h, w], got shape {cams.shape}"
        )
    columns = 1 + cams.shape[1]
    figure = new_figure(2.2 * columns, 2.3 * count + 0.4)
    grid = figure.subplots(count, columns, squeeze=False)
    for row in range(count):
        grey = grey_pixels(images[row])
        height, width = grey.shape
        row_boxes = np.zeros((0, 4)) if boxes is None or boxes[row] is None else np.asarray(boxes[row])
        panels = [(grey, None, ids[row] if ids is not None else f"image {row}")]
        for k, name in enumerate(map_names):
            cam = resize_map(cams[row, k], height, width)
            label = name if scores is None else f"{name} {float(np.asarray(scores)[row, k]):.2f}"
            panels.append((cam_overlay(grey, cam, alpha), cam, label))
        for col, (picture, cam, label) in enumerate(panels):
            axes = grid[row, col]
            if cam is None:
                axes.imshow(picture, cmap="gray", vmin=0, vmax=255)
            else:
                axes.imshow(picture)
                peak = cam_peak(cam)
                axes.plot([peak.x], [peak.y], marker="+", color="white", markersize=9, mew=1.5)
            for box in row_boxes.reshape(-1, 4):
                xmin, ymin, xmax, ymax = box
                axes.add_patch(
                    Rectangle(
                        (xmin * width - 0.5, ymin * height - 0.5),
                        (xmax - xmin) * width,
                        (ymax - ymin) * height,
                        fill=False,
                        edgecolor="lime",
                        linewidth=1.0,
                    )
                )
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(label, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return _write_bytes(path, buffer.getvalue())
