"""CAM overlays: colours, peak, boxes, the PNG files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from matplotlib import colormaps

from caaxr_tf.explain.localization import boxes_to_mask
from caaxr_tf.explain.plots import (
    BOX_COLOUR,
    OVERLAY_ALPHA,
    PEAK_COLOUR,
    box_pixels,
    cam_overlay,
    cam_peak,
    plot_cam_grid,
    render_cam_overlay,
    save_cam_overlay,
)


def test_peak_location_and_ties():
    cam = np.zeros((6, 10), np.float32)
    cam[2, 7] = 0.9
    cam[4, 1] = 0.9  # tie later in row-major order: the first one is kept
    peak = cam_peak(cam)
    assert (peak.x, peak.y, peak.value) == (7, 2, pytest.approx(0.9))
    assert (peak.x_norm, peak.y_norm) == (pytest.approx(7.5 / 10), pytest.approx(2.5 / 6))
    assert type(peak.x_norm) is float and type(peak.x) is int
    assert peak.as_dict() == {"x": 7, "y": 2, "x_norm": 0.75, "y_norm": 0.416667, "value": 0.9}


def test_overlay_colours_are_the_jet_blend():
    image = np.tile(np.arange(0, 240, 30, dtype=np.uint8), (8, 1))  # [8, 8]
    cam = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    overlay = cam_overlay(image[..., None], cam)
    jet = colormaps["jet"](cam.astype(np.float64))[..., :3] * 255
    expected = np.rint((1 - OVERLAY_ALPHA) * image[..., None].astype(np.float64) + OVERLAY_ALPHA * jet)
    assert overlay.dtype == np.uint8 and overlay.shape == (8, 8, 3)
    assert np.abs(overlay.astype(int) - expected).max() <= 1


def test_render_marks_peak_and_boxes():
    image = np.full((40, 40), 100, np.uint8)
    cam = np.zeros((5, 5), np.float32)
    cam[1, 3] = 1.0  # after resizing to 40 x 40 the peak is near (x 28, y 12)
    box = [0.1, 0.5, 0.6, 0.9]
    overlay, peak = render_cam_overlay(image, cam, boxes=[box])
    resized = cv2.resize(cam, (40, 40), interpolation=cv2.INTER_LINEAR)
    assert (peak.y, peak.x) == np.unravel_index(int(np.argmax(resized)), resized.shape)
    assert abs(peak.x - 28) <= 1 and abs(peak.y - 12) <= 1
    assert tuple(overlay[peak.y, peak.x]) == PEAK_COLOUR
    x0, y0, x1, y1 = box_pixels(box, 40, 40)
    # The rectangle is the outline of the pixels the mask rule puts inside the box.
    rows, cols = np.nonzero(boxes_to_mask([box], 40))
    assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max(), rows.max())
    for y, x in ((y0, x0), (y1, x1), (y0, (x0 + x1) // 2), ((y0 + y1) // 2, x1)):
        assert tuple(overlay[y, x]) == BOX_COLOUR
    assert tuple(overlay[(y0 + y1) // 2, (x0 + x1) // 2]) != BOX_COLOUR


def test_saved_overlay_and_grid(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    cam = np.random.default_rng(1).uniform(0, 1, (4, 4)).astype(np.float32)
    path = tmp_path / "out" / "a_overlay.png"
    peak = save_cam_overlay(image, cam, path, boxes=[[0.2, 0.2, 0.8, 0.8]])
    written = cv2.imread(str(path), cv2.IMREAD_COLOR)
    expected, expected_peak = render_cam_overlay(image, cam, boxes=[[0.2, 0.2, 0.8, 0.8]])
    np.testing.assert_array_equal(written[..., ::-1], expected)  # lossless PNG, RGB order
    assert peak == expected_peak
    assert [p.name for p in path.parent.iterdir()] == ["a_overlay.png"]  # no temporary left

    images = np.stack([image, image[::-1]])[..., None]
    cams = np.random.default_rng(2).uniform(0, 1, (2, 3, 4, 4))
    grid = plot_cam_grid(
        images, cams, tmp_path / "grid.png", ["covid", "pneumonia", "healthy"],
        boxes=[[[0.1, 0.1, 0.5, 0.5]], None], scores=np.full((2, 3), 1 / 3), ids=["a", "b"],
        title="test",
    )
    picture = cv2.imread(str(grid))
    assert picture is not None and picture.shape[1] > picture.shape[0]  # 4 columns, 2 rows
    with pytest.raises(ValueError, match="cams must be"):
        plot_cam_grid(images, cams[:, :2], tmp_path / "bad.png", ["covid", "pneumonia", "healthy"])
    assert not (tmp_path / "bad.png").exists()
