"""Localization scores on hand-made maps and boxes with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caaxr_tf.explain.localization import (
    aggregate,
    boxes_to_mask,
    center_gaussian_map,
    energy_inside,
    format_table,
    localization_scores,
    localization_table,
    pointing_game,
    thresholded_iou,
    uniform_map,
)

# 4 x 4 map, total 10; the box x 0.5..0.75, y 0.25..0.75 holds the pixel centres of
# column 2, rows 1 and 2 (values 2 and 4).
MAP = np.array(
    [
        [0, 0, 0, 0],
        [0, 1, 2, 0],
        [0, 3, 4, 0],
        [0, 0, 0, 0],
    ],
    dtype=np.float32,
)
BOX = [[0.5, 0.25, 0.75, 0.75]]


def test_mask_rule_by_hand():
    mask = boxes_to_mask(BOX, 4)
    assert sorted(zip(*np.nonzero(mask))) == [(1, 2), (2, 2)]
    # 4 rows x 8 columns: centres x (j + .5) / 8 in [0.25, 0.75) -> j = 2..5; y in [0.5, 1) -> i = 2, 3.
    wide = boxes_to_mask([[0.25, 0.5, 0.75, 1.0]], 4, 8)
    assert wide.shape == (4, 8)
    assert sorted(zip(*np.nonzero(wide))) == [(i, j) for i in (2, 3) for j in range(2, 6)]
    # A left/top edge on a pixel centre is inside, a right/bottom edge on a centre is not.
    edge = boxes_to_mask([[0.125, 0.125, 0.375, 0.375]], 4)  # centres at 0.125, 0.375
    assert sorted(zip(*np.nonzero(edge))) == [(0, 0)]
    assert not boxes_to_mask(np.zeros((0, 4)), 4).any()


@pytest.mark.parametrize("size", [16, 224])
def test_mask_twin_agrees_with_the_pipeline(size):
    import tensorflow as tf

    from caaxr_tf.data.pipeline import boxes_to_mask as tf_boxes_to_mask

    rng = np.random.default_rng(size)
    # Edges on pixel centres and pixel borders, where float rounding decides, and random ones.
    grid = np.arange(0, 2 * size + 1) / (2 * size)
    for trial in range(40):
        count = int(rng.integers(1, 4))
        values = rng.choice(grid, (count, 4)) if trial % 2 else rng.uniform(0, 1, (count, 4))
        boxes = np.stack(
            [np.minimum(values[:, 0], values[:, 2]), np.minimum(values[:, 1], values[:, 3]),
             np.maximum(values[:, 0], values[:, 2]), np.maximum(values[:, 1], values[:, 3])],
            axis=1,
        ).astype(np.float32)
        expected = tf_boxes_to_mask(tf.constant(boxes), size).numpy()[:, :, 0].astype(bool)
        np.testing.assert_array_equal(boxes_to_mask(boxes, size), expected)


def test_scores_of_a_hand_made_map():
    mask = boxes_to_mask(BOX, 4)
    assert pointing_game(MAP, mask) == 1.0
    assert energy_inside(MAP, mask) == pytest.approx(0.6)  # (2 + 4) / 10
    # >= 0.5 * 4: values 2, 3, 4 (3 pixels); 2 of them in the 2-pixel mask -> 2 / 3.
    assert thresholded_iou(MAP, mask) == pytest.approx(2 / 3)
    # >= 0.8 * 4: only the 4 -> 1 / 2.
    assert thresholded_iou(MAP, mask, threshold=0.8) == pytest.approx(0.5)
    scores = localization_scores(MAP, BOX)
    assert scores.as_dict() == pytest.approx({"pointing": 1.0, "energy": 0.6, "iou": 2 / 3})

    moved = MAP.copy()
    moved[2, 1] = 5  # the peak leaves the box
    assert localization_scores(moved, BOX).pointing == 0.0
    assert localization_scores(moved, BOX).energy == pytest.approx(6 / 12)


def test_ties_constant_and_empty_maps():
    mask = boxes_to_mask(BOX, 4)
    tied = MAP.copy()
    tied[2, 1] = 4  # two maxima: (2, 1) outside, (2, 2) inside
    assert pointing_game(tied, mask) == 0.5
    # A constant map scores the box-area fraction (2 of 16 pixels) on all three.
    for constant in (uniform_map(4, 4), np.full((4, 4), 7.0), np.zeros((4, 4))):
        scores = localization_scores(constant, BOX)
        assert scores.as_dict() == pytest.approx({"pointing": 2 / 16, "energy": 2 / 16, "iou": 2 / 16})
    undefined = localization_scores(MAP, np.zeros((0, 4)))
    assert all(math.isnan(v) for v in undefined.as_dict().values())


def test_center_gaussian_baseline():
    odd = center_gaussian_map(5, 5)
    assert odd.argmax() == 12 and odd[2, 2] == pytest.approx(1.0)
    # One pixel from the centre: exp(-0.5 * (1 / (0.25 * 5)) ** 2).
    assert odd[2, 3] == pytest.approx(math.exp(-0.5 * 0.8**2), rel=1e-6)
    np.testing.assert_allclose(odd, odd.T, rtol=1e-7)
    np.testing.assert_allclose(odd, odd[::-1, ::-1], rtol=1e-7)
    wide = center_gaussian_map(4, 8, sigma=0.5)
    assert wide[1, 3] == pytest.approx(math.exp(-0.5 * ((0.5 / 4) ** 2 + (0.5 / 2) ** 2)), rel=1e-6)
    even = center_gaussian_map(4, 4)
    # The four middle pixels tie; a box on one of them gets a quarter of the point.
    assert localization_scores(even, [[0.25, 0.25, 0.5, 0.5]]).pointing == 0.25
    with pytest.raises(ValueError, match="sigma"):
        center_gaussian_map(4, 4, sigma=0)


def test_aggregate_and_table():
    maps = np.stack([MAP, np.fliplr(MAP), MAP])
    boxes = [BOX, BOX, np.zeros((0, 4))]
    # Image 2 (mirrored): peak 4 at (2, 1), outside; the mask pixels hold 1 and 3 -> energy
    # 4 / 10; region >= 2 is (1, 1), (2, 1), (2, 2), sharing (2, 2) with the mask -> IoU 1 / 4.
    # Image 3 has no boxes: left out and counted.
    table = localization_table(maps, boxes)
    assert list(table) == ["cam", "center_gaussian", "uniform"]
    cam = table["cam"]
    assert (cam["num_images"], cam["num_without_boxes"]) == (2, 1)
    assert cam["hit_rate"] == pytest.approx((1.0 + 0.0) / 2)
    assert cam["energy"] == pytest.approx((0.6 + 0.4) / 2)
    assert cam["iou"] == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert table["uniform"]["hit_rate"] == pytest.approx(2 / 16)
    assert table["uniform"]["iou"] == pytest.approx(2 / 16)
    # The Gaussian's four tied maxima include (1, 2) and (2, 2) of the box: 2 of 4.
    assert table["center_gaussian"]["hit_rate"] == pytest.approx(0.5)
    gaussian = center_gaussian_map(4, 4)
    assert table["center_gaussian"]["energy"] == pytest.approx(
        float(gaussian[1, 2] + gaussian[2, 2]) / float(gaussian.sum()), rel=1e-6
    )
    assert all(row["threshold"] == 0.5 for row in table.values())
    text = format_table(table)
    assert text.splitlines()[1].split() == ["cam", "2", "0.500", "0.500", "0.458"]
    empty = aggregate([localization_scores(MAP, np.zeros((0, 4)))])
    assert empty["num_images"] == 0 and math.isnan(empty["hit_rate"])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="non-negative"):
        localization_scores(MAP - 1, BOX)
    with pytest.raises(ValueError, match=r"\[K, 4\]"):
        localization_scores(MAP, [[0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="xmin <= xmax"):
        localization_scores(MAP, [[0.5, 0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        localization_scores(np.full((4, 4), np.nan), BOX)
    with pytest.raises(ValueError, match="threshold"):
        thresholded_iou(MAP, boxes_to_mask(BOX, 4), threshold=1.5)
    with pytest.raises(ValueError, match="2 maps but boxes for 1 images"):
        localization_table(np.stack([MAP, MAP]), [BOX])


def test_streamed_grad_cam_scores_match_the_table_of_the_maps():
    """A model whose class-1 Grad-CAM is the image itself: a 1x1 identity conv, global average
    pooling and logits (-mean, +mean). Streaming it through score_explanations must give the
    scores of the images used as maps."""
    import keras

    from caaxr_tf.explain.gradcam import GradCam
    from caaxr_tf.explain.localization import score_explanations, table_from_scores

    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones", name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(2, activation="softmax", kernel_initializer="zeros")
    outputs = dense(pooled)
    model = keras.Model(inputs, outputs)
    dense.kernel.assign(np.array([[-1.0, 1.0]], np.float32))

    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 0.2, (5, 8, 8, 1)).astype(np.float32)
    images[0, 2, 5, 0] = 1.0  # a clear peak inside image 0's box
    images[1, 6, 1, 0] = 1.0  # and outside image 1's box
    boxes = [np.array([[0.5, 0.125, 0.875, 0.5]]), np.array([[0.5, 0.125, 0.875, 0.5]]),
             np.zeros((0, 4)), np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([[0.0, 0.0, 0.5, 0.5]])]
    explainer = GradCam(model, layer="features")
    batches = [(images[:2], boxes[:2]), (images[2:], boxes[2:])]

    scores = score_explanations(explainer, batches, class_index=1)

    expected = localization_table(images[..., 0], boxes)
    table = table_from_scores(scores)
    for name in expected:
        assert table[name] == pytest.approx(expected[name], rel=1e-5), name
    assert [s.pointing for s in scores["cam"][:2]] == [1.0, 0.0]
    assert table["cam"]["num_images"] == 4 and table["cam"]["num_without_boxes"] == 1
