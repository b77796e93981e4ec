"""Checking box coordinates read from annotation files (CSV cells, COCO ``bbox`` lists).

``parse_box`` turns four raw values into a ``Box`` in pixel ``xyxy`` form, or raises
``BoxError`` naming the first bad value as the caller labelled it (a CSV column, a COCO field),
so each reader reports the file, row and field.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from caaxr_tf.data.records import Box

# Annotations made on a resized copy can overrun the far edge by a fraction of a pixel
# (rounding); such boxes are clipped to the image, larger overruns are reported.
EDGE_TOLERANCE_PX = 1.0


class BoxError(ValueError):
    """One bad box value: ``label`` names the coordinate as the caller spelled it."""

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.label = label
        self.reason = reason


def _number(label: str, value: Any) -> float:
    if value is None:
        raise BoxError(label, "is null")
    if isinstance(value, bool):
        raise BoxError(label, f"not a number ({value!r})")
    if isinstance(value, str):
        if not value.strip():
            raise BoxError(label, "is empty")
        try:
            value = float(value)
        except ValueError:
            raise BoxError(label, f"not a number ({value.strip()!r})") from None
    if not isinstance(value, (int, float)):
        raise BoxError(label, f"not a number ({value!r})")
    if math.isnan(value):
        raise BoxError(label, "is NaN")
    if math.isinf(value):
        raise BoxError(label, f"not finite ({value})")
    return float(value)


def parse_box(
    values: Sequence[tuple[str, Any]],
    box_format: str = "xywh",
    image_size: tuple[int, int] | None = None,
    finding: str = "abnormality",
) -> Box:
    """Check one box and return it in pixel ``xyxy`` form.

    Args:
        values: four ``(label, raw value)`` pairs: x, y, then width, height (``xywh``) or
            x_max, y_max (``xyxy``). Labels only name the values in errors.
        box_format: ``xywh`` or ``xyxy``.
        image_size: ``(height, width)`` when known; the box must then lie inside the image
            (an overrun below ``EDGE_TOLERANCE_PX`` at the far edge is clipped).
        finding: stored on the box.

    Raises:
        BoxError: naming the first bad value (null/NaN/non-numeric, negative, empty box,
            outside the image).
    """
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    (x_label, x_raw), (y_label, y_raw), (a_label, a_raw), (b_label, b_raw) = values
    x, y = _number(x_label, x_raw), _number(y_label, y_raw)
    a, b = _number(a_label, a_raw), _number(b_label, b_raw)
    for label, value in ((x_label, x), (y_label, y), (a_label, a), (b_label, b)):
        if value < 0:
            raise BoxError(label, f"negative ({value:g})")
    if box_format == "xywh":
        if a <= 0:
            raise BoxError(a_label, f"box width must be > 0 (got {a:g})")
        if b <= 0:
            raise BoxError(b_label, f"box height must be > 0 (got {b:g})")
        xmax, ymax = x + a, y + b
    else:
        if a <= x:
            raise BoxError(a_label, f"must be greater than {x_label} ({a:g} <= {x:g})")
        if b <= y:
            raise BoxError(b_label, f"must be greater than {y_label} ({b:g} <= {y:g})")
        xmax, ymax = a, b
    if image_size is not None:
        height, width = image_size
        for start, end, limit, start_label, end_label, axis in (
            (x, xmax, width, x_label, a_label, "width"),
            (y, ymax, height, y_label, b_label, "height"),
        ):
            if start >= limit:
                raise BoxError(start_label, f"{start:g} is outside the image ({axis} {limit})")
            if end > limit + EDGE_TOLERANCE_PX:
                reason = f"box ends at {end:g}, outside the image ({axis} {limit})"
                raise BoxError(end_label, reason)
        xmax, ymax = min(xmax, width), min(ymax, height)
    return Box(x, y, xmax, ymax, finding)
