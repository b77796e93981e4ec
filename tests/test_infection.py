"""Infection maps: focal + Dice loss, pooled pixel F1, detection rule, per-lung severity."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from tolerances import KERNEL_RTOL
import tensorflow as tf
from sklearn.metrics import f1_score

from caaxr_tf.infection import (
    FocalDiceLoss,
    InfectionDetection,
    LungSplit,
    PixelCounts,
    PixelF1,
    detect_covid,
    detection_rates,
    infected_pixel_count,
    lung_infection_fractions,
    per_image_focal_dice_loss,
    pixel_counts,
    pixel_f1,
    restrict_to_lungs,
    split_lungs,
)
from caaxr_tf.metrics import dice_per_image

pytestmark = [
    pytest.mark.numerics,  # numerics: rerun with oneDNN off by `make test` (tolerances.py)
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def _masks(seed: int, n: int, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth blobs and noisy probabilities that overlap them in part."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        if rng.random() < 0.8:  # some images have no infection
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(2, 5, 2)
            truth[i, y:y + h, x:x + w] = 1.0
    probs = np.clip(0.6 * truth + rng.uniform(0, 0.55, truth.shape), 0, 1).astype(np.float32)
    probs[rng.random(truth.shape) < 0.01] = 0.5  # exactly at the threshold: counted positive
    return truth, probs


# --------------------------------------------------------------------------- loss


def _reference_loss(y, p, focal_weight=1.0, dice_weight=1.0, alpha=0.25, gamma=2.0, balance=True, smooth=1.0):
    """Lin et al.'s focal loss and the soft Dice loss, per image, in float64 numpy."""
    y, p = y.astype(np.float64), p.astype(np.float64)
    # Keras clips to [epsilon, 1 - epsilon] with epsilon = 1e-7, in float32
    clipped = np.clip(p, np.float32(1e-7), np.float32(1) - np.float32(1e-7))
    bce = -(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    p_t = y * p + (1 - y) * (1 - p)
    focal = (1 - p_t) ** gamma * bce
    if balance:
        focal *= y * alpha + (1 - y) * (1 - alpha)
    axes = (1, 2, 3)
    dice = 1 - (2 * (y * p).sum(axes) + smooth) / (y.sum(axes) + p.sum(axes) + smooth)
    return focal_weight * focal.mean(axes) + dice_weight * dice


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(focal_weight=0.5, dice_weight=2.0, alpha=0.8, gamma=1.0),
        dict(dice_weight=0.0, balance=False, gamma=3.0),
        dict(focal_weight=0.0, smooth=0.5),
    ],
)
def test_focal_dice_loss_matches_numpy_reference(options):
    y, p = _masks(seed=1, n=6)
    p = np.clip(p, 0.0, 1.0)
    p[0, 0, 0, 0], p[1, 0, 0, 0] = 0.0, 1.0  # the clipping path
    expected = _reference_loss(y, p, **options)
    kwargs = {("apply_class_balancing" if k == "balance" else k): v for k, v in options.items()}
    per_image = per_image_focal_dice_loss(y, p, **kwargs).numpy()
    assert per_image.shape == (6,)
    # float32 per-image reductions against float64 NumPy: the kernel's addition order (tolerances.py)
    np.testing.assert_allclose(per_image, expected, rtol=KERNEL_RTOL, atol=1e-6)
    # without the channel axis, and as a Keras loss (mean over images)
    without_channel = per_image_focal_dice_loss(y[..., 0], p[..., 0], **kwargs).numpy()
    np.testing.assert_allclose(without_channel, expected, rtol=KERNEL_RTOL, atol=1e-6)
    np.testing.assert_allclose(float(FocalDiceLoss(**kwargs)(y, p)), expected.mean(), rtol=KERNEL_RTOL)


def test_focal_term_without_focusing_is_binary_cross_entropy():
    y, p = _masks(seed=2, n=3)
    plain = per_image_focal_dice_loss(y, p, dice_weight=0.0, gamma=0.0, apply_class_balancing=False).numpy()
    bce = keras.losses.binary_crossentropy(y, p).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(plain, bce, rtol=KERNEL_RTOL)  # two TF formulas of the same mean: other reductions
    # a perfect empty prediction of an empty mask costs (almost) nothing; a miss costs a lot
    empty = np.zeros((1, 8, 8, 1), np.float32)
    assert float(per_image_focal_dice_loss(empty, empty)[0]) < 1e-5
    assert float(per_image_focal_dice_loss(np.ones_like(empty), empty)[0]) > 0.9


def test_focal_dice_loss_config_and_checks(tmp_path):
    loss = FocalDiceLoss(focal_weight=0.3, dice_weight=0.7, alpha=0.6, gamma=1.5, apply_class_balancing=False)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, FocalDiceLoss) and clone.get_config() == loss.get_config()
    with pytest.raises(ValueError, match="not both 0"):
        FocalDiceLoss(focal_weight=0.0, dice_weight=0.0)
    with pytest.raises(ValueError, match="alpha"):
        FocalDiceLoss(alpha=1.5)
    # compiled into a model that is saved and loaded again
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
    model.compile(optimizer="sgd", loss=loss, metrics=[PixelF1()])
    y, p = _masks(seed=3, n=4, size=8)
    before = model.evaluate(p, y, verbose=0, return_dict=True)
    model.save(tmp_path / "m.keras")
    after = keras.models.load_model(tmp_path / "m.keras").evaluate(p, y, verbose=0, return_dict=True)
    # two traced evaluations (before/after loading): Keras may trace them differently
    assert after["loss"] == pytest.approx(before["loss"], rel=KERNEL_RTOL)
    assert after["pixel_f1"] == pytest.approx(before["pixel_f1"], rel=1e-6)  # integer pixel counts: exact


# --------------------------------------------------------------------------- pixel F1


def test_pixel_f1_pools_all_pixels_unlike_mean_dice():
    truth = np.zeros((2, 10, 10, 1), np.float32)
    truth[0, :10, :10] = 1.0  # 100 infected pixels, all found
    pred = truth.copy()
    pred[1, 0, :10] = 0.9  # 10 false positives on an image without infection
    assert pixel_f1(truth, pred) == pytest.approx(200 / 210)
    np.testing.assert_allclose(dice_per_image(truth, pred), [1.0, 0.0])  # mean Dice: 0.5
    metric = PixelF1()
    metric.update_state(truth, pred)
    assert float(metric.result()) == pytest.approx(200 / 210, rel=1e-6)
    assert float(metric.precision()) == pytest.approx(100 / 110, rel=1e-6)
    assert float(metric.recall()) == pytest.approx(1.0)


def test_pixel_f1_over_batches_matches_numpy_and_sklearn():
    truth, probs = _masks(seed=4, n=23)
    metric = PixelF1(threshold=0.5)
    counts = PixelCounts()
    for start in range(0, 23, 5):  # batches of 5, 5, 5, 5, 3
        metric.update_state(truth[start:start + 5], probs[start:start + 5])
        counts.update(truth[start:start + 5], probs[start:start + 5])
    expected = f1_score(truth.ravel() > 0.5, probs.ravel() >= 0.5)
    assert counts.f1 == pytest.approx(expected, rel=1e-12)
    assert pixel_f1(truth, probs) == pytest.approx(expected, rel=1e-12)
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    whole = pixel_counts(truth, probs)
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (
        whole.true_positives, whole.false_positives, whole.false_negatives)
    assert float(metric.true_positives.numpy()) == whole.true_positives
    assert metric.true_positives.dtype == "float64"
    # one weight per image: weight 2 equals seeing the image twice
    weighted = PixelF1()
    weights = np.ones(23, np.float32)
    weights[3] = 2.0
    weighted.update_state(truth, probs, sample_weight=weights)
    doubled = np.concatenate([truth, truth[3:4]]), np.concatenate([probs, probs[3:4]])
    assert float(weighted.result()) == pytest.approx(pixel_f1(*doubled), rel=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0
    assert math.isnan(pixel_f1(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))))
    clone = PixelF1.from_config(PixelF1(threshold=0.3, name="f1_30").get_config())
    assert clone.threshold == 0.3 and clone.name == "f1_30"


@pytest.fixture(scope="module")
def strategy():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices (see conftest.py)")
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def test_pixel_f1_under_mirrored_strategy(strategy):
    truth, probs = _masks(seed=5, n=19)
    expected = f1_score(truth.ravel() > 0.5, probs.ravel() >= 0.5)
    with strategy.scope():
        metric = PixelF1()
    # batch 4 with a ragged last batch: the replicas get unequal shares
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((truth, probs)).batch(4))

    @tf.function
    def step(y, p):
        strategy.run(metric.update_state, args=(y, p))

    for _ in range(2):  # the second pass checks reset_state under the strategy
        metric.reset_state()
        for y, p in dataset:
            step(y, p)
        assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    local = [float(v) for v in strategy.experimental_local_results(metric.true_positives.value)]
    assert len(local) == 2 and all(part > 0 for part in local)
    assert sum(local) == pixel_counts(truth, probs).true_positives


# --------------------------------------------------------------------------- detection


def test_restrict_to_lungs():
    infection = np.array([[0.9, 0.2], [0.7, 0.6]], np.float32)
    lungs = np.array([[True, False], [False, True]])
    np.testing.assert_array_equal(restrict_to_lungs(infection, lungs), np.float32([[0.9, 0.0], [0.0, 0.6]]))
    lung_probs = np.array([[0.5, 0.49], [0.1, 1.0]], np.float32)  # a lung model's map, lung at >= 0.5
    np.testing.assert_array_equal(restrict_to_lungs(infection[None, ..., None], lung_probs[None]),
                                  np.float32([[[[0.9], [0.0]], [[0.0], [0.6]]]]))
    with pytest.raises(ValueError, match="does not match"):
        restrict_to_lungs(infection, lungs[:1])


def test_detection_rule_and_rates():
    maps = np.zeros((4, 5, 5, 1), np.float32)
    maps[0] = 0.49  # nothing reaches t = 0.5
    maps[1, 2, 2] = 0.5  # one pixel exactly at t
    maps[2, :3, 0, 0] = [0.55, 0.7, 0.95]  # three pixels
    maps[3, 1:4, 1:4] = 0.8  # nine pixels
    np.testing.assert_array_equal(infected_pixel_count(maps), [0, 1, 3, 9])
    np.testing.assert_array_equal(infected_pixel_count(maps[..., 0], threshold=0.75), [0, 0, 1, 9])
    np.testing.assert_array_equal(detect_covid(maps), [False, True, True, True])  # published: any pixel
    np.testing.assert_array_equal(detect_covid(maps, min_pixels=3), [False, False, True, True])
    np.testing.assert_array_equal(detect_covid(maps, threshold=0.9, min_pixels=1), [False, False, True, False])
    with pytest.raises(ValueError, match="min_pixels"):
        detect_covid(maps, min_pixels=0)

    rates = detection_rates([1, 1, 1, 0, 0], [True, False, True, True, False])
    assert (rates.true_positives, rates.false_negatives, rates.true_negatives, rates.false_positives) == (2, 1, 1, 1)
    assert rates.sensitivity == pytest.approx(2 / 3) and rates.specificity == 0.5
    assert math.isnan(detection_rates([0, 0], [0, 1]).sensitivity)
    assert math.isnan(detection_rates([1], [1]).specificity)


def test_detection_layer_matches_numpy(tmp_path):
    rng = np.random.default_rng(6)
    maps = (rng.random((5, 16, 16, 1)) ** 6).astype(np.float32)  # mostly low, a few high pixels
    maps[0] = 0.0
    lungs = np.zeros_like(maps)
    lungs[:, 2:14, 1:7] = lungs[:, 2:14, 9:15] = 1.0
    for lung_input in (None, lungs):
        layer = InfectionDetection(threshold=0.5, min_pixels=2)
        restricted = maps if lung_input is None else restrict_to_lungs(maps, lung_input)
        out_map, count, covid = (t.numpy() for t in (layer(maps) if lung_input is None else layer([maps, lung_input])))
        np.testing.assert_array_equal(out_map, restricted)
        np.testing.assert_array_equal(count, infected_pixel_count(restricted))
        np.testing.assert_array_equal(covid, detect_covid(restricted, min_pixels=2).astype(np.float32))
    assert covid.sum() not in (0, 5)  # the rule separates these maps
    # inside a saved functional model
    map_in, lung_in = keras.Input((16, 16, 1)), keras.Input((16, 16, 1))
    model = keras.Model([map_in, lung_in], InfectionDetection(min_pixels=2, name="detect")([map_in, lung_in]))
    model.save(tmp_path / "detect.keras")
    reloaded = keras.models.load_model(tmp_path / "detect.keras")
    for a, b in zip(reloaded([maps, lungs]), model([maps, lungs])):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert reloaded.get_layer("detect").min_pixels == 2


# --------------------------------------------------------------------------- per-lung severity


def _two_lungs() -> np.ndarray:
    """A 12 x 16 mask: image-left lung 8 x 4 = 32 px, image-right lung 6 x 3 = 18 px, a 2-px speck."""
    mask = np.zeros((12, 16), bool)
    mask[2:10, 2:6] = True  # image left: the patient's right lung
    mask[3:9, 10:13] = True  # image right: the patient's left lung
    mask[10, 14:16] = True  # a detached speck beside the left lung
    return mask


def test_split_lungs_by_components():
    split = split_lungs(_two_lungs())
    assert split.method == "components"
    assert np.count_nonzero(split.right) == 32 and split.right[2:10, 2:6].all()
    assert np.count_nonzero(split.left) == 20 and split.left[10, 14:16].all()  # the speck joins the nearer lung
    assert not (split.right & split.left).any()
    mirrored = split_lungs(_two_lungs(), patient_right_on_image_left=False)
    np.testing.assert_array_equal(mirrored.right, split.left)
    # lung probabilities work like a mask
    np.testing.assert_array_equal(split_lungs(_two_lungs().astype(np.float32) * 0.8).right, split.right)


def test_split_lungs_midline_fallbacks():
    touching = np.zeros((6, 10), bool)
    touching[1:5, 2:8] = True  # one component across the midline (x = 5)
    split = split_lungs(touching)
    assert split.method == "midline"
    np.testing.assert_array_equal(np.nonzero(split.right.any(axis=0))[0], [2, 3, 4])
    np.testing.assert_array_equal(np.nonzero(split.left.any(axis=0))[0], [5, 6, 7])

    one_lung = np.zeros((6, 10), bool)
    one_lung[1:5, 6:9] = True  # only the patient's left lung
    split = split_lungs(one_lung)
    assert split.method == "midline" and not split.right.any() and np.count_nonzero(split.left) == 12

    same_side = np.zeros((8, 10), bool)
    same_side[0:3, 6:9] = same_side[5:8, 6:9] = True  # two large parts, both right of the midline
    assert split_lungs(same_side).method == "midline" and not split_lungs(same_side).right.any()

    tiny_partner = np.zeros((10, 10), bool)
    tiny_partner[0:10, 0:4] = True  # 40 px
    tiny_partner[5, 8] = True  # 1 px across the midline: under 10 % of the lung area
    split = split_lungs(tiny_partner)
    assert split.method == "midline" and np.count_nonzero(split.right) == 40 and np.count_nonzero(split.left) == 1

    empty = split_lungs(np.zeros((4, 4)))
    assert empty.method == "empty" and not empty.right.any() and not empty.left.any()


def test_lung_infection_fractions():
    lungs = _two_lungs()
    infection = np.zeros(lungs.shape, np.float32)
    infection[2:4, 2:6] = 0.9  # 8 of the right lung's 32 pixels
    infection[3:9, 10:13] = 0.6  # all 18 pixels of the left lung's main part (not the speck)
    infection[0, :] = 0.99  # outside the lungs: ignored
    severity = lung_infection_fractions(infection[..., None], lungs)
    assert severity.right_fraction == pytest.approx(8 / 32)
    assert severity.left_fraction == pytest.approx(18 / 20)
    assert severity.total_fraction == pytest.approx(26 / 52)
    assert (severity.right_lung_pixels, severity.left_lung_pixels, severity.split_method) == (32, 20, "components")
    assert lung_infection_fractions(infection, lungs, threshold=0.7).left_fraction == 0.0
    # a missing lung has no fraction
    one_lung = np.zeros_like(lungs)
    one_lung[3:9, 10:13] = True
    missing = lung_infection_fractions(infection, one_lung)
    assert math.isnan(missing.right_fraction) and missing.left_fraction == 1.0
    # a precomputed split is used as given
    given = LungSplit(right=lungs & False, left=lungs, method="components")
    assert lung_infection_fractions(infection, given).left_fraction == pytest.approx(26 / 52)
    assert set(severity.as_dict()) >= {"right_lung_infected_fraction", "left_lung_infected_fraction"}
