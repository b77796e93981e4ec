"""Tests for caaxr_tf.models.mask_rcnn: box math, anchors, RoIAlign, targets, training, inference, saving."""

from __future__ import annotations


import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from caaxr_tf.data.pipeline import boxes_to_mask
from caaxr_tf.tasks.datasets import make_dataset
from caaxr_tf.data.tfrecords import build_tfrecords
from caaxr_tf.models import WeightsUnavailableError, available_models, build_model, model_task
from caaxr_tf.models.mask_rcnn import (
    LOSS_NAMES,
    MaskRCNN,
    MultiLevelRoIAlign,
    box_mask_targets,
    decode_boxes,
    encode_boxes,
    iou_matrix,
    level_anchors,
    paste_masks,
    pyramid_anchors,
    roi_align,
    rpn_targets,
    sample_rois,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

# A small network that still has every part of the full one.
SMALL = dict(
    backbone="mobilenetv2",
    alpha=0.35,
    fpn_filters=64,
    box_head_units=128,
    mask_head_filters=64,
    mask_head_convs=2,
    rois_per_image=64,
    mask_rois_per_image=8,
    rpn_pre_nms_top_k=(500, 300),
    rpn_post_nms_top_k=(200, 100),
)
SIZE = 128
MAX_BOXES = 4


def _scenes(count: int, size: int, seed: int = 0):
    """Noisy dark images with one or two bright rectangles; boxes padded to MAX_BOXES."""
    rng = np.random.default_rng(seed)
    images = rng.normal(60.0, 10.0, (count, size, size, 1))
    boxes = np.zeros((count, MAX_BOXES, 4), np.float32)
    num_boxes = np.zeros(count, np.int32)
    for i in range(count):
        num_boxes[i] = 1 + i % 2
        for j in range(num_boxes[i]):
            h, w = rng.uniform(0.2, 0.45, 2)
            y = rng.uniform(0.05, 0.95 - h)
            x = rng.uniform(0.02 + 0.5 * j, 0.48 + 0.5 * j - w) if num_boxes[i] == 2 else rng.uniform(0.05, 0.95 - w)
            pixels = np.round(np.array([y, x, y + h, x + w]) * size).astype(int)
            boxes[i, j] = pixels / size
            images[i, pixels[0] : pixels[2], pixels[1] : pixels[3], 0] += 120.0
    targets = {"boxes": tf.constant(boxes), "num_boxes": tf.constant(num_boxes)}
    return tf.constant(np.clip(images, 0, 255).astype(np.float32)), targets


def _np_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            ih = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            iw = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - ih * iw
            out[i, j] = ih * iw / union if union > 0 else 0.0
    return out


# --------------------------------------------------------------------------- boxes and anchors


def test_box_encode_decode_round_trip_and_known_deltas():
    rng = np.random.default_rng(1)
    centres, sizes = rng.uniform(0, 1, (2, 50, 2)), rng.uniform(0.02, 0.8, (2, 50, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=-1).astype(np.float32)
    boxes, anchors = boxes[0], boxes[1]
    deltas = encode_boxes(boxes, anchors)
    np.testing.assert_allclose(decode_boxes(deltas, anchors).numpy(), boxes, atol=1e-5)
    # A wild size delta is clipped (at 1000/16 times the anchor) instead of overflowing.
    wild = decode_boxes(tf.constant([[0.0, 0.0, 1e4, 0.0]]), tf.constant([[0.5, 0.5, 0.51, 0.51]])).numpy()
    assert np.isfinite(wild).all() and wild[0, 2] - wild[0, 0] == pytest.approx(0.01 * 1000 / 16, rel=1e-4)

    anchor = tf.constant([[0.2, 0.2, 0.4, 0.6]])
    shifted_doubled = tf.constant([[0.2, 0.2, 0.6, 0.6]])  # centre down by half the height, height x2
    np.testing.assert_allclose(
        encode_boxes(shifted_doubled, anchor).numpy(), [[10 * 0.5, 0.0, 5 * np.log(2.0), 0.0]], atol=1e-6
    )


def test_iou_matrix_matches_numpy_reference():
    rng = np.random.default_rng(2)
    corners = rng.uniform(0, 1, (30, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=-1)
    special = np.array(
        [
            [0.1, 0.1, 0.3, 0.3],  # contains the next
            [0.15, 0.15, 0.25, 0.25],
            [0.5, 0.5, 0.5, 0.7],  # zero area
            [0.7, 0.7, 0.9, 0.9],  # disjoint from the first two
            [0.1, 0.1, 0.3, 0.3],  # identical to the first
        ]
    )
    boxes = np.concatenate([boxes, special]).astype(np.float32)
    got = iou_matrix(tf.constant(boxes[:20]), tf.constant(boxes[10:])).numpy()
    np.testing.assert_allclose(got, _np_iou(boxes[:20], boxes[10:]), atol=1e-6)
    square = iou_matrix(tf.constant(special, tf.float32), tf.constant(special, tf.float32)).numpy()
    assert square[0, 4] == pytest.approx(1.0) and square[0, 1] == pytest.approx(0.25)
    assert square[2, 2] == 0.0 and square[0, 3] == 0.0
    # Leading axes broadcast: [1, N, 4] with [B, M, 4].
    batched = iou_matrix(tf.constant(boxes[None, :20]), tf.constant(np.stack([boxes[10:], boxes[:25]])))
    np.testing.assert_allclose(batched.numpy()[1], _np_iou(boxes[:20], boxes[:25]), atol=1e-6)


@pytest.mark.parametrize("image_size", [(224, 224), (128, 96)])
def test_anchors_cover_the_image_at_every_level(image_size):
    sizes, ratios = (16, 32, 64, 128, 256), (0.5, 1.0, 2.0)
    strides = (4, 8, 16, 32, 64)
    feature_sizes = [(-(-image_size[0] // s), -(-image_size[1] // s)) for s in strides]
    height, width = image_size
    centres_y = (np.arange(height) + 0.5) / height
    centres_x = (np.arange(width) + 0.5) / width
    for feature_size, size, stride in zip(feature_sizes, sizes, strides):
        anchors = level_anchors(feature_size, image_size, size, ratios)
        assert anchors.shape == (feature_size[0] * feature_size[1] * len(ratios), 4)
        pixels = anchors * np.array([height, width, height, width])
        # Sizes and ratios: the area is size**2, height / width the ratio, cycling fastest.
        extent_h, extent_w = pixels[:, 2] - pixels[:, 0], pixels[:, 3] - pixels[:, 1]
        np.testing.assert_allclose(np.sqrt(extent_h * extent_w), size, rtol=1e-5)
        np.testing.assert_allclose(extent_h / extent_w, np.tile(ratios, len(anchors) // 3), rtol=1e-5)
        # Centres sit on the cell centres of the level's grid.
        cy = (pixels[:, 0] + pixels[:, 2]) / 2
        assert cy.min() == pytest.approx(height / feature_size[0] / 2, abs=1e-3)
        # Every pixel centre lies inside an anchor of this level.
        inside_y = (centres_y[:, None] >= anchors[None, :, 0]) & (centres_y[:, None] <= anchors[None, :, 2])
        inside_x = (centres_x[:, None] >= anchors[None, :, 1]) & (centres_x[:, None] <= anchors[None, :, 3])
        covered = (inside_y[:, None, :] & inside_x[None, :, :]).any(axis=-1)
        assert covered.all(), f"level with stride {stride} leaves pixels uncovered"
    everything = pyramid_anchors(feature_sizes, image_size, sizes, ratios)
    assert len(everything) == sum(h * w * 3 for h, w in feature_sizes)


# --------------------------------------------------------------------------- RoIAlign and pasting


def _np_bilinear(feature: np.ndarray, y: float, x: float) -> np.ndarray:
    """Reference bilinear sample (Detectron's RoIAlign rule: zero beyond one pixel, clamp within)."""
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * feature[y0, x0]
        + (1 - ly) * lx * feature[y0, x1]
        + ly * (1 - lx) * feature[y1, x0]
        + ly * lx * feature[y1, x1]
    )


def _np_roi_align(feature: np.ndarray, box: np.ndarray, out: int, ratio: int) -> np.ndarray:
    height, width = feature.shape[:2]
    y1, x1 = box[0] * height - 0.5, box[1] * width - 0.5
    bin_h, bin_w = (box[2] - box[0]) * height / out, (box[3] - box[1]) * width / out
    result = np.zeros((out, out, feature.shape[-1]))
    for i in range(out):
        for j in range(out):
            samples = [
                _np_bilinear(feature, y1 + (i + (a + 0.5) / ratio) * bin_h, x1 + (j + (b + 0.5) / ratio) * bin_w)
                for a in range(ratio)
                for b in range(ratio)
            ]
            result[i, j] = np.mean(samples, axis=0)
    return result


def test_roi_align_matches_numpy_bilinear_reference():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
    boxes = np.array(
        [
            [0.1, 0.2, 0.6, 0.9],
            [0.0, 0.0, 1.0, 1.0],  # whole map: samples within half a pixel of the border clamp
            [0.33, 0.41, 0.37, 0.47],  # smaller than a bin
            [-0.2, 0.8, 0.3, 1.15],  # reaches beyond the map: zeros there
            [0.5, 0.05, 0.95, 0.3],
        ],
        np.float32,
    )
    indices = np.array([0, 1, 0, 1, 1], np.int32)
    for out, ratio in ((2, 2), (3, 1), (4, 3)):
        got = roi_align(tf.constant(features), tf.constant(boxes), tf.constant(indices), out, ratio).numpy()
        want = np.stack([_np_roi_align(features[i], b, out, ratio) for b, i in zip(boxes, indices)])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_multilevel_roi_align_reads_the_level_of_each_box_and_passes_gradients():
    rng = np.random.default_rng(4)
    image = (64, 64)
    features = [tf.constant(rng.normal(size=(2, 64 // s, 64 // s, 2)).astype(np.float32)) for s in (4, 8, 16, 32)]
    # A box of 56 px reads P4 here: 16 px -> P2, 32 px -> P3, 57.6 px -> P4, 6.4 px -> P2 (the lowest).
    boxes = np.array(
        [[[0, 0, 0.25, 0.25], [0.1, 0.1, 1.0, 1.0]], [[0.2, 0.2, 0.7, 0.7], [0.5, 0.5, 0.6, 0.6]]], np.float32
    )
    layer = MultiLevelRoIAlign(3, sampling_ratio=2, image_size=image, canonical_size=56, canonical_level=4)
    got = layer(features, tf.constant(boxes)).numpy()
    assert got.shape == (2, 2, 3, 3, 2)
    expected_levels = {(0, 0): 2, (0, 1): 4, (1, 0): 3, (1, 1): 2}
    for (b, r), level in expected_levels.items():
        want = roi_align(features[level - 2], boxes[b, r][None], tf.constant([b]), 3, 2).numpy()[0]
        np.testing.assert_allclose(got[b, r], want, atol=1e-6)
    restored = MultiLevelRoIAlign.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()

    with tf.GradientTape() as tape:
        tape.watch(features)
        total = tf.reduce_sum(layer(features, tf.constant(boxes)))
    grads = tape.gradient(total, features)
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads[:3])
    assert float(tf.reduce_sum(tf.abs(grads[3]))) == 0.0  # no box reads P5


def test_paste_masks_matches_grid_sampling_and_reproduces_box_masks():
    size = 64
    boxes = np.array([[0.25, 0.125, 0.75, 0.5], [0.0, 0.5, 0.4, 1.0]], np.float32)  # pixel-aligned edges
    ones = tf.ones((2, 28, 28))
    pasted = paste_masks(ones, tf.constant(boxes), (size, size)).numpy()
    for box, mask in zip(boxes, pasted):
        expected = boxes_to_mask(tf.constant(box[[1, 0, 3, 2]][None]), size).numpy()[..., 0]
        np.testing.assert_array_equal(mask >= 0.5, expected.astype(bool))

    # A random mask against bilinear sampling at the pixel centres with zeros outside.
    rng = np.random.default_rng(5)
    mask = rng.uniform(size=(1, 7, 7)).astype(np.float32)
    box = np.array([0.3, 0.2, 0.7, 0.9], np.float32)
    got = paste_masks(tf.constant(mask), tf.constant(box[None]), (size, size)).numpy()[0]
    padded = np.pad(mask[0], 1)[..., None]
    for y in range(0, size, 5):
        for x in range(0, size, 3):
            my = ((y + 0.5) / size - box[0]) / (box[2] - box[0]) * 7 - 0.5 + 1
            mx = ((x + 0.5) / size - box[1]) / (box[3] - box[1]) * 7 - 0.5 + 1
            inside = 0 <= my <= 8 and 0 <= mx <= 8
            want = _np_bilinear(padded, my, mx)[0] if inside else 0.0
            assert got[y, x] == pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------- targets


def test_rpn_targets_label_and_sample_anchors():
    """The exact positive set: every anchor with IoU >= 0.7 with some box, plus the best anchor of
    each box even below 0.7; the negatives sampled have IoU < 0.3. Box A (16x16, half a pixel
    off the anchor grid) has five anchors >= 0.7, only one of them its best; box B (13x13) has
    a single best anchor at IoU 0.66. Both are distinct from thresholds and ties by > 0.002."""
    anchors = tf.constant(level_anchors((32, 32), (64, 64), 16, (0.5, 1.0, 2.0)))
    box_a = np.array([23.5, 25.0, 39.5, 41.0]) / 64
    box_b = np.array([40.5, 4.5, 53.5, 17.5]) / 64
    gt = tf.constant([[box_a, box_b, [0, 0, 0, 0]], [[0, 0, 0, 0]] * 3], tf.float32)
    valid = tf.constant([[True, True, False], [False, False, False]])
    targets = rpn_targets(anchors, gt, valid, samples_per_image=32, positive_fraction=0.5)
    positive, sampled = targets.positive.numpy(), targets.sampled.numpy()

    iou = _np_iou(anchors.numpy().astype(np.float64), np.stack([box_a, box_b]))  # [A, 2]
    above = iou.max(axis=1) >= 0.7
    best = np.zeros(len(iou), bool)
    best[iou.argmax(axis=0)] = True
    assert above.sum() == 5 and not above[iou[:, 1].argmax()] and (best & ~above).sum() == 1  # the case is what it claims
    np.testing.assert_array_equal(np.flatnonzero(positive[0]), np.flatnonzero(above | best))
    np.testing.assert_array_equal(targets.labels.numpy()[0], positive[0].astype(np.float32))
    negatives = sampled[0] & ~positive[0]
    assert negatives.sum() == 32 - 6 and (iou[negatives].max(axis=1) < 0.3).all()
    assert not positive[1].any() and sampled[1].sum() == 32  # no boxes: all negatives
    for box, anchor in ((0, iou[:, 0].argmax()), (1, iou[:, 1].argmax())):
        np.testing.assert_allclose(decode_boxes(targets.deltas[0, anchor], anchors[anchor]).numpy(), gt[0, box], atol=1e-5)


def test_sample_rois_puts_positives_first_and_encodes_their_boxes():
    gt = tf.constant([[[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.8], [0, 0, 0, 0]]], tf.float32)
    gt_valid = tf.constant([[True, True, False]])
    gt_classes = tf.constant([[1, 2, 0]])
    proposals = tf.constant([[[0.12, 0.1, 0.5, 0.52], [0.6, 0.6, 0.88, 0.8], [0.0, 0.5, 0.3, 1.0], [0, 0, 0, 0]]])
    proposal_valid = tf.constant([[True, True, True, False]])
    samples = sample_rois(proposals, proposal_valid, gt, gt_classes, gt_valid, rois_per_image=8, positive_fraction=0.5)
    positive, valid = samples.positive.numpy()[0], samples.valid.numpy()[0]
    # 2 proposals + 2 ground-truth boxes are positive, 1 proposal negative; the padding is never used.
    np.testing.assert_array_equal(positive, [True] * 4 + [False] * 4)
    np.testing.assert_array_equal(valid, [True] * 5 + [False] * 3)
    rois, classes = samples.rois.numpy()[0], samples.classes.numpy()[0]
    assert sorted(classes[:4]) == [1, 1, 2, 2] and classes[4] == 0
    np.testing.assert_allclose(rois[4], [0.0, 0.5, 0.3, 1.0])
    decoded = decode_boxes(samples.deltas[0, :4], samples.rois[0, :4]).numpy()
    np.testing.assert_allclose(decoded, samples.gt_boxes.numpy()[0, :4], atol=1e-5)
    for roi, cls, gt_box in zip(rois[:4], classes[:4], samples.gt_boxes.numpy()[0, :4]):
        assert _np_iou(roi[None], gt_box[None])[0, 0] >= 0.5 and gt_box[0] == (0.1 if cls == 1 else 0.6)


def test_box_mask_targets_are_the_filled_box_seen_through_the_roi():
    roi = tf.constant([[0.0, 0.0, 0.5, 0.5]])
    np.testing.assert_array_equal(box_mask_targets(roi, roi, 8).numpy(), np.ones((1, 8, 8)))
    left_half = box_mask_targets(roi, tf.constant([[0.0, 0.0, 0.5, 0.25]]), 8).numpy()[0]
    np.testing.assert_array_equal(left_half[:, :4], 1.0)
    np.testing.assert_array_equal(left_half[:, 4:], 0.0)


# --------------------------------------------------------------------------- the model


def test_registered_as_detection_model_with_checked_arguments():
    # a detection model: on a segmentation protocol it runs the detection task
    assert available_models("detection") == ["maskrcnn"]
    assert model_task("maskrcnn") == "detection"
    with pytest.raises(ValueError, match="multiples of 32"):
        build_model("maskrcnn", input_shape=(100, 100, 1), **SMALL)
    with pytest.raises(ValueError, match="unknown Mask R-CNN backbone 'vgg19'"):
        build_model("maskrcnn", backbone="vgg19")
    with pytest.raises(ValueError, match="mask_rois_per_image"):
        build_model("maskrcnn", input_shape=(64, 64, 1), **{**SMALL, "mask_rois_per_image": 17})


@pytest.fixture(scope="module")
def trained():
    """A small Mask R-CNN trained for a few steps on 4 synthetic scenes, and its inference outputs."""
    keras.utils.set_random_seed(0)
    images, targets = _scenes(4, SIZE)
    # Frozen BatchNorm: the inference-mode statistics are those training used.
    model = build_model("maskrcnn", input_shape=(SIZE, SIZE, 1), freeze_backbone="bn", **SMALL)
    optimizer = keras.optimizers.Adam(2e-3)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            losses = model.compute_losses(images, targets, training=True)
        grads = tape.gradient(losses["loss"], model.trainable_variables)
        assert all(g is not None for g in grads)  # every trainable part reaches the loss (at trace time)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return losses

    history = [{k: float(v) for k, v in step().items()} for _ in range(100)]
    outputs = tf.function(lambda x: model(x, training=False))(images)
    return {"model": model, "images": images, "targets": targets, "history": history, "outputs": outputs}


def test_overfits_a_handful_of_images(trained):
    history = trained["history"]
    assert set(history[0]) == {"loss", *LOSS_NAMES}
    first = np.mean([h["loss"] for h in history[:3]])
    last = np.mean([h["loss"] for h in history[-10:]])
    assert last <= 0.2 * first, f"total loss fell from {first:.3f} to {last:.3f} only"
    boxes, scores = trained["outputs"]["boxes"].numpy(), trained["outputs"]["scores"].numpy()
    gt, counts = trained["targets"]["boxes"].numpy(), trained["targets"]["num_boxes"].numpy()
    for i in range(len(gt)):
        confident = boxes[i][scores[i] >= 0.5]
        iou = _np_iou(gt[i, : counts[i]], confident)
        assert iou.shape[1] and (iou.max(axis=1) > 0.5).all(), f"image {i}: best IoU {iou.max(axis=1)}"
    # The union mask is the boxes: Dice of the thresholded mask against the pipeline's box mask.
    masks = trained["outputs"]["mask"].numpy()[..., 0] >= 0.5
    for i in range(len(gt)):
        truth = boxes_to_mask(tf.constant(gt[i, : counts[i]][:, [1, 0, 3, 2]]), SIZE).numpy()[..., 0] > 0
        dice = 2 * (masks[i] & truth).sum() / (masks[i].sum() + truth.sum())
        assert dice > 0.8, f"image {i}: Dice {dice:.3f}"


def test_inference_outputs_are_fixed_size_padded_and_consistent(trained):
    model, out = trained["model"], trained["outputs"]
    k = model.max_detections
    assert out["mask"].shape == (4, SIZE, SIZE, 1) and out["mask"].dtype == tf.float32
    assert out["boxes"].shape == (4, k, 4) and out["scores"].shape == (4, k)
    assert out["classes"].shape == (4, k) and out["classes"].dtype == tf.int32
    assert out["num_detections"].shape == (4,) and out["num_detections"].dtype == tf.int32
    assert out["instance_masks"].shape == (4, k, 28, 28)
    boxes, scores, classes = out["boxes"].numpy(), out["scores"].numpy(), out["classes"].numpy()
    for i, n in enumerate(out["num_detections"].numpy()):
        assert 1 <= n <= k
        assert (scores[i, :n] >= model.detection_score_threshold).all()
        assert (np.diff(scores[i, :n]) <= 1e-6).all()  # best first
        assert (classes[i, :n] == 1).all() and (classes[i, n:] == 0).all()
        assert (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all()
        assert (boxes[i, :n, 2:] >= boxes[i, :n, :2]).all() and boxes.min() >= 0 and boxes.max() <= 1
    # The semantic mask is the union (max) of the pasted instance masks scoring >= the threshold.
    flat_masks, flat_boxes = tf.reshape(out["instance_masks"], [-1, 28, 28]), tf.reshape(out["boxes"], [-1, 4])
    pasted = paste_masks(flat_masks, flat_boxes, (SIZE, SIZE)).numpy().reshape(4, k, SIZE, SIZE)
    keep = (scores >= model.mask_score_threshold)[:, :, None, None]
    # atol: the model pasted inside a tf.function (Grappler may reorder the box arithmetic); for a
    # thin box a rounding change of the sample coordinates moves the bilinear value by ~1e-5..1e-4
    np.testing.assert_allclose(out["mask"].numpy()[..., 0], (pasted * keep).max(axis=1), atol=1e-3)
    assert out["mask"].numpy().min() >= 0.0 and out["mask"].numpy().max() <= 1.0


@pytest.mark.numerics
def test_save_load_and_export_round_trip(trained, tmp_path):
    model, images, expected = trained["model"], trained["images"], trained["outputs"]
    path = tmp_path / "maskrcnn.keras"
    model.save(path)
    restored = keras.saving.load_model(path, compile=False)
    assert isinstance(restored, MaskRCNN)
    assert restored.get_config() == model.get_config()
    assert [v.trainable for v in restored.weights] == [v.trainable for v in model.weights]
    # Eagerly, the restored model reproduces the original bit for bit.
    want, got = model(images, training=False), restored(images, training=False)
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)

    export_dir = tmp_path / "exported"
    restored.export(str(export_dir), verbose=False)
    reloaded = tf.saved_model.load(str(export_dir))  # keep a reference: it owns the variables
    served = reloaded.serve(images)
    # Graph optimisations (fused ops) change the last float bits only.
    for key in ("mask", "boxes", "scores", "classes", "num_detections"):
        np.testing.assert_allclose(served[key].numpy(), expected[key].numpy(), atol=1e-4, err_msg=key)


def test_compute_losses_under_mirrored_strategy_in_tf_function(tiny_data_root, tmp_path):
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs the two logical CPUs set up by conftest.py")
    keras.utils.set_random_seed(1)
    strategy = tf.distribute.MirroredStrategy([cpus[0].name, cpus[1].name])
    build_tfrecords(tiny_data_root, tmp_path / "tfrecords", protocols="seg", workers=1, progress=False)
    dataset = make_dataset(tmp_path / "tfrecords" / "seg", "train", batch_size=4, image_size=64, task="detection")

    def with_classes(images, targets):
        # Two classes, alternating over the boxes, exercise the class-specific outputs.
        classes = 1 + tf.range(tf.shape(targets["boxes"])[1]) % 2
        return images, {**targets, "classes": tf.broadcast_to(classes, tf.shape(targets["boxes"])[:2])}

    with strategy.scope():
        model = build_model("maskrcnn", num_classes=2, input_shape=(64, 64, 1), **SMALL)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset.map(with_classes))))

    @tf.function
    def train_step(batch):
        def replica_step(images, targets):
            assert images.shape[0] == 2  # the global batch of 4 is split between the replicas
            with tf.GradientTape() as tape:
                losses = model.compute_losses(images, targets, training=True)
            grads = tape.gradient(losses["loss"], model.trainable_variables)
            assert all(g is not None for g in grads)
            norm = tf.linalg.global_norm(grads)
            return {**losses, "grad_norm": norm}

        per_replica = strategy.run(replica_step, args=batch)
        return {k: strategy.experimental_local_results(v) for k, v in per_replica.items()}

    results = train_step(batch)
    assert set(results) == {"loss", "grad_norm", *LOSS_NAMES}
    for replica in range(2):
        values = {k: float(v[replica]) for k, v in results.items()}
        assert all(np.isfinite(v) for v in values.values()), values
        assert values["grad_norm"] > 0
        # the step's float32 sum of its parts against Python's float64 sum of the same values: ulps
        assert values["loss"] == pytest.approx(sum(values[name] for name in LOSS_NAMES), rel=1e-5)
        assert values["head_box"] > 0 and values["mask"] > 0  # ground-truth boxes give positive RoIs



# --------------------------------------------------------------------------- backbone weights


def _assert_backbone_equals(model: MaskRCNN, source: keras.Model) -> None:
    for layer in source.layers:
        if not layer.weights:
            continue
        for a, b in zip(model.backbone.get_layer(layer.name).weights, layer.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_backbone_weights_from_a_file_or_the_imagenet_cache(tmp_path, offline_keras_cache):
    from keras.src.legacy.saving import legacy_h5_format

    small = {k: v for k, v in SMALL.items() if k not in ("backbone", "alpha")}
    mobilenet = dict(input_shape=(96, 96, 1), backbone="mobilenetv2", alpha=0.35, **small)
    with pytest.raises(WeightsUnavailableError, match="ImageNet weights for mobilenetv2 are unavailable"):
        build_model("maskrcnn", weights="imagenet", **mobilenet)

    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3), alpha=0.35)
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    model = build_model("maskrcnn", weights=str(path), **mobilenet)
    _assert_backbone_equals(model, source)
    # Pretrained backbones keep their BatchNorm statistics; the convolutions still train.
    batch_norms = [layer for layer in model.backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert model.freeze_backbone == "bn" and batch_norms and not any(layer.trainable for layer in batch_norms)
    assert all(layer.trainable for layer in model.backbone.layers if isinstance(layer, keras.layers.Conv2D))

    offline_keras_cache.mkdir(parents=True)
    cached = offline_keras_cache / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"
    with h5py.File(cached, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    model = build_model("maskrcnn", weights="imagenet", **mobilenet)
    _assert_backbone_equals(model, source)

    with pytest.raises(ValueError, match="does not match the resnet50 backbone"):
        build_model("maskrcnn", input_shape=(64, 64, 1), weights=str(path), backbone="resnet50", **small)
