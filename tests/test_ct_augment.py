"""The CT augmentation: seeded, identity, each transform's effect and range, Keras' matrix order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tolerances import KERNEL_RTOL
import tensorflow as tf

from caaxr_tf.ct.augment import (
    CTAugmentation,
    apply_ct_transforms,
    augment_ct_batch,
    ct_transform_matrices,
    identity_parameters,
    sample_ct_parameters,
)

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)


def point_image(size: int, x: int, y: int, batch: int = 1) -> tf.Tensor:
    image = np.zeros((batch, size, size, 1), np.float32)
    image[:, y, x, 0] = 1.0
    return tf.constant(image)


def with_parameters(batch: int = 1, **changes: float) -> dict[str, tf.Tensor]:
    parameters = identity_parameters(batch)
    for name, value in changes.items():
        parameters[name] = tf.fill([batch], float(value))
    return parameters


def brightest(image: tf.Tensor) -> tuple[int, int]:
    y, x = np.unravel_index(np.argmax(image.numpy()[0, :, :, 0]), image.shape[1:3])
    return int(x), int(y)


def test_identity_parameters_return_the_input():
    images = tf.random.stateless_uniform((3, 32, 48, 1), [1, 2], 0, 5000)
    np.testing.assert_array_equal(apply_ct_transforms(images, identity_parameters(3)).numpy(), images.numpy())


def test_same_seed_same_output_other_seed_other_output():
    images = tf.random.stateless_uniform((4, 64, 64, 1), [3, 4], 0, 5000)
    first = augment_ct_batch(images, tf.constant([7, 8]))
    np.testing.assert_array_equal(first.numpy(), augment_ct_batch(images, tf.constant([7, 8])).numpy())
    assert not np.allclose(first.numpy(), augment_ct_batch(images, tf.constant([7, 9])).numpy())
    traced = tf.function(augment_ct_batch, input_signature=[
        tf.TensorSpec([None, 64, 64, 1], tf.float32), tf.TensorSpec([2], tf.int32)])
    # traced against eager: the matrices' float32 trigonometry may take other kernels
    np.testing.assert_allclose(traced(images, tf.constant([7, 8])).numpy(), first.numpy(), rtol=KERNEL_RTOL)


def test_shift_moves_a_pixel_by_the_shift():
    moved = apply_ct_transforms(point_image(16, 5, 7), with_parameters(shift_x=3 / 16, shift_y=-2 / 16))
    # The output samples input (x + 3, y - 2): the bright input pixel lands at (5 - 3, 7 + 2).
    assert brightest(moved) == (2, 9) and moved.numpy().sum() == pytest.approx(1.0)


def test_flips_mirror_about_the_centre():
    assert brightest(apply_ct_transforms(point_image(16, 5, 7), with_parameters(flip_x=1))) == (10, 7)
    assert brightest(apply_ct_transforms(point_image(16, 5, 7), with_parameters(flip_y=1))) == (5, 8)
    both = apply_ct_transforms(point_image(16, 5, 7), with_parameters(flip_x=1, flip_y=1))
    assert brightest(both) == (10, 8) and both.numpy().max() == 1.0


def test_rotation_by_a_quarter_turn():
    rotated = apply_ct_transforms(point_image(16, 5, 7), with_parameters(angle=math.pi / 2))
    # input = c + R (out - c), so out = c + R^T (p - c): (5, 7) - 7.5 -> (-0.5, 2.5) + 7.5 = (7, 10).
    assert brightest(rotated) == (7, 10)
    assert rotated.numpy()[0, 10, 7, 0] == pytest.approx(1.0, abs=1e-5)


def test_zoom_scales_distances_from_the_centre():
    zoomed = apply_ct_transforms(point_image(15, 5, 9), with_parameters(zoom_x=0.5, zoom_y=0.5))
    # Zoom 0.5 samples at half the distance: the pixel at (5, 9) (centre 7) appears at (3, 11).
    values = zoomed.numpy()[0, :, :, 0]
    assert values[11, 3] == pytest.approx(1.0) and values[11, 4] == pytest.approx(0.5)


def test_matrices_follow_keras_order():
    """rotation @ shift @ shear @ zoom about the centre, then flips: built here with numpy."""
    rng = np.random.default_rng(0)
    height, width = 40, 64
    cx, cy = (width - 1) / 2, (height - 1) / 2
    for _ in range(5):
        p = dict(angle=rng.uniform(-6, 6), shift_x=rng.uniform(-0.05, 0.05), shift_y=rng.uniform(-0.05, 0.05),
                 shear=rng.uniform(-0.6, 0.6), zoom_x=rng.uniform(0.9, 1.1), zoom_y=rng.uniform(0.9, 1.1),
                 flip_x=float(rng.integers(0, 2)), flip_y=float(rng.integers(0, 2)))
        c, s = math.cos(p["angle"]), math.sin(p["angle"])
        rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        shift = np.array([[1, 0, p["shift_x"] * width], [0, 1, p["shift_y"] * height], [0, 0, 1]])
        shear = np.array([[1, -math.sin(p["shear"]), 0], [0, math.cos(p["shear"]), 0], [0, 0, 1]])
        zoom = np.diag([p["zoom_x"], p["zoom_y"], 1.0])
        flip = np.diag([1 - 2 * p["flip_x"], 1 - 2 * p["flip_y"], 1.0])
        to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
        back = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
        expected = back @ rotation @ shift @ shear @ zoom @ flip @ to_centre
        parameters = {k: tf.constant([v], tf.float32) for k, v in p.items()}
        got = ct_transform_matrices(parameters, height, width).numpy()[0]
        # float32 matrix products against float64: ~1e-7 relative of translations up to ~60 px
        np.testing.assert_allclose(got[:6], expected[:2].reshape(-1), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(got[6:], [0, 0])


def test_sampled_ranges_match_the_published_generator():
    p = {k: v.numpy() for k, v in sample_ct_parameters(4000, tf.constant([1, 2])).items()}
    assert np.abs(p["angle"]).max() <= 2 * math.pi and np.abs(p["angle"]).max() > 0.98 * 2 * math.pi
    for name in ("shift_x", "shift_y"):
        assert np.abs(p[name]).max() <= 0.05 and np.abs(p[name]).max() > 0.049
    assert np.abs(p["shear"]).max() <= math.radians(0.05) and np.abs(p["shear"]).max() > math.radians(0.049)
    for name in ("zoom_x", "zoom_y"):
        assert p[name].min() >= 0.95 and p[name].max() <= 1.05 and p[name].max() > 1.049
    assert not np.allclose(p["zoom_x"], p["zoom_y"])  # x and y zoom independently, as Keras does
    for name in ("flip_x", "flip_y"):
        assert set(np.unique(p[name])) == {0.0, 1.0} and 0.46 < p[name].mean() < 0.54
    off = sample_ct_parameters(100, tf.constant([1, 2]), CTAugmentation(horizontal_flip=False, vertical_flip=False))
    assert off["flip_x"].numpy().max() == 0 and off["flip_y"].numpy().max() == 0


def test_raw_values_are_kept_and_edges_filled_by_the_nearest_pixel():
    constant = tf.fill((4, 48, 48, 1), 1234.0)
    out = augment_ct_batch(constant, tf.constant([5, 6]))
    np.testing.assert_allclose(out.numpy(), 1234.0, rtol=1e-5)  # no zero corners; bilinear weights sum to 1 in float32
    ramp = tf.reshape(tf.range(48 * 48, dtype=tf.float32), (1, 48, 48, 1)) + 24.0
    out = augment_ct_batch(ramp, tf.constant([1, 1])).numpy()
    assert out.min() >= 24.0 - 1e-3 and out.max() <= 48 * 48 - 1 + 24.0 + 1e-3
