"""The tf.data pipeline: decoding, inversion, scaling, resizing, masks, batching and errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.pipeline import boxes_to_mask, parse_record, preprocess_image
from caaxr_tf.tasks.datasets import make_dataset


@pytest.fixture(scope="module")
def built(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline_tfrecords")
    tfr.build_tfrecords(tiny_data_root, out, workers=1, progress=False, log=lambda line: None)
    return out


def synthetic_images(data_root: Path) -> dict[str, dict]:
    manifest = json.loads((data_root / "synthetic.json").read_text())
    return {e["image_id"]: e for e in manifest["images"]}


def records(protocol_dir: Path, pattern: str = "*.tfrecord") -> list[dict]:
    files = sorted(str(p) for p in protocol_dir.rglob(pattern))
    return [
        {k: v.numpy() for k, v in parse_record(s).items()}
        for s in tf.data.TFRecordDataset(files)
    ]


def png(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


@pytest.mark.parametrize("bits, dtype", [(8, np.uint8), (12, np.uint16), (16, np.uint16)])
def test_constant_images_scale_to_the_8bit_range(bits, dtype):
    full = (1 << bits) - 1
    for value in (0, full // 3, full):
        out = preprocess_image(png(np.full((40, 30), value, dtype)), bits, 0).numpy()
        assert out.shape == (224, 224, 1) and out.dtype == np.uint8
        assert np.all(out == round(value * 255 / full))
        inverted = preprocess_image(png(np.full((40, 30), value, dtype)), bits, 1).numpy()
        assert np.all(inverted == round((full - value) * 255 / full))


def test_jpeg_input_and_bicubic_resize_of_a_gradient():
    ramp = np.tile(np.linspace(0, 255, 448).astype(np.uint8), (448, 1))
    out = preprocess_image(png(ramp), 8, 0).numpy()[..., 0].astype(int)
    reference = cv2.resize(ramp, (224, 224), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(out - reference).max() <= 2
    assert np.all(np.diff(out[112]) >= 0)
    jpeg = cv2.imencode(".jpg", ramp, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    assert np.abs(preprocess_image(jpeg, 8, 0).numpy()[..., 0].astype(int) - out).max() <= 3


def pil_bicubic(pixels: np.ndarray, size: int) -> np.ndarray:
    """Pillow's antialiased bicubic resize (Keys a = -0.5, kernel widened by the reduction
    factor) on float values: an implementation independent of TensorFlow's."""
    from PIL import Image

    image = Image.fromarray(pixels.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)


@pytest.mark.parametrize("bits", [8, 12])
def test_bicubic_antialiased_resize_of_a_high_frequency_pattern(bits):
    """A chirp (stripes ever finer towards the right, up to above the new Nyquist limit) and
    noise, reduced by non-integer factors: only an antialiased bicubic matches Pillow's to one
    grey level; area, bilinear, Mitchell or plain bicubic are 19 to 138 levels off."""
    full = (1 << bits) - 1
    y, x = np.mgrid[0:450, 0:301]
    chirp = 0.5 + 0.5 * np.sin(x * x / 180.0) * np.cos(y / 3.1)
    noise = np.random.default_rng(bits).uniform(size=(450, 301))
    for pattern in (chirp, noise):
        pixels = np.rint(pattern * full).astype(np.uint8 if bits == 8 else np.uint16)
        ours = preprocess_image(png(pixels), bits, 0).numpy()[..., 0].astype(np.float64)
        reference = np.clip(np.rint(pil_bicubic(pixels, 224) * 255.0 / full), 0, 255)
        difference = np.abs(ours - reference)
        assert difference.max() <= 1 and np.mean(difference > 0) < 0.01
        # the pattern tells resizing methods apart
        plain = tf.image.resize(pixels[..., None].astype(np.float32), [224, 224], method="bicubic").numpy()[..., 0]
        assert np.abs(np.clip(np.rint(plain * 255.0 / full), 0, 255) - reference).max() > 20
        area = cv2.resize(pixels.astype(np.float32), (224, 224), interpolation=cv2.INTER_AREA)
        assert np.abs(np.clip(np.rint(area * 255.0 / full), 0, 255) - reference).max() > 10


def test_8bit_jpeg_and_png_use_the_same_range():
    """tf.io.decode_image(dtype=uint16) widens JPEG by 256, PNG by 257: white must stay 255 for both."""
    image = np.full((32, 32), 255, np.uint8)
    image[8:24, 8:24] = 128
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    from_jpeg = preprocess_image(jpeg, 8, 0, image_size=32).numpy()[..., 0]
    np.testing.assert_array_equal(from_jpeg, decoded)  # same size: no resampling, decoders agree
    np.testing.assert_array_equal(preprocess_image(png(decoded), 8, 0, image_size=32).numpy()[..., 0], decoded)
    assert from_jpeg.max() == 255


def test_inverted_records_match_their_non_inverted_originals(built):
    inverted = [r for r in records(built / "2class", "test-*") if r["image/invert"] == 1]
    assert inverted, "the tiny set has inverted BIMCV images"
    for record in inverted:
        stored = cv2.imdecode(np.frombuffer(record["image/encoded"], np.uint8), cv2.IMREAD_UNCHANGED)
        full = (1 << int(record["image/bit_depth"])) - 1
        original = (full - stored.astype(np.int64)).astype(np.uint16)
        from_inverted = preprocess_image(record["image/encoded"], record["image/bit_depth"], 1)
        from_original = preprocess_image(png(original), record["image/bit_depth"], 0)
        # the same arithmetic in another order (resize, then invert): equal up to float rounding
        difference = np.abs(from_inverted.numpy().astype(int) - from_original.numpy().astype(int))
        assert difference.max() <= 1 and np.mean(difference > 0) < 0.01


def test_every_image_comes_out_with_dark_lungs_and_bright_mediastinum(built, tiny_data_root):
    truth = synthetic_images(tiny_data_root)
    dataset = make_dataset(built / "2class", "test", batch_size=64, with_ids=True)
    seen_inverted = 0
    for images, _, ids in dataset:
        for image, image_id in zip(images.numpy()[..., 0], ids.numpy()):
            centre = image[60:160, 104:120].mean()
            lungs = np.concatenate([image[70:150, 55:80], image[70:150, 144:169]]).mean()
            assert centre > lungs + 10, image_id
            seen_inverted += truth.get(image_id.decode(), {}).get("invert", False)  # CheXpert ids differ
    assert seen_inverted > 0


def test_masks_match_boxes_after_resizing(built, tiny_data_root):
    truth = synthetic_images(tiny_data_root)
    dataset = make_dataset(built / "seg", "test", batch_size=8, with_ids=True)
    centres = (np.arange(224) + 0.5) / 224
    checked = 0
    for _, masks, ids in dataset:
        for mask, image_id in zip(masks.numpy()[..., 0], ids.numpy()):
            entry = truth[image_id.decode()]
            expected = np.zeros((224, 224), bool)
            for box in entry["boxes"]:
                xs = (centres >= box["x"] / entry["width"]) & (centres < (box["x"] + box["width"]) / entry["width"])
                ys = (centres >= box["y"] / entry["height"]) & (centres < (box["y"] + box["height"]) / entry["height"])
                expected |= ys[:, None] & xs[None, :]
            np.testing.assert_array_equal(mask.astype(bool), expected)
            assert expected.any()
            checked += 1
    assert checked == json.loads((built / "seg" / "summary.json").read_text())["counts"]["test"]["lesion"]


def test_boxes_to_mask_edges():
    mask = boxes_to_mask(tf.constant([[0.0, 0.5, 0.25, 1.0]]), 8).numpy()[..., 0]
    expected = np.zeros((8, 8), np.uint8)
    expected[4:, :2] = 1
    np.testing.assert_array_equal(mask, expected)
    assert boxes_to_mask(tf.zeros([0, 4]), 8).numpy().sum() == 0


def test_classification_batches_are_one_hot_and_complete(built):
    summary = json.loads((built / "4class" / "summary.json").read_text())
    dataset = make_dataset(built / "4class", "val", fold=2, batch_size=5)
    labels = np.concatenate([y.numpy() for _, y in dataset])
    assert labels.shape[1] == 4 and np.all(labels.sum(axis=1) == 1)
    counts = dict(zip(summary["classes"], labels.sum(axis=0).astype(int).tolist()))
    assert {k: v for k, v in counts.items() if v} == summary["counts"]["fold2"]["val"]
    images, _ = next(iter(dataset))
    assert images.shape == (5, 224, 224, 1) and images.dtype == tf.float32


def test_training_batches_shuffle_and_augment_reproducibly(built):
    def first_batch(seed):
        dataset = make_dataset(built / "seg", "train", batch_size=4, seed=seed, drop_remainder=True)
        images, masks = next(iter(dataset))
        return images.numpy(), masks.numpy()

    a_images, a_masks = first_batch(1)
    b_images, b_masks = first_batch(1)
    np.testing.assert_array_equal(a_images, b_images)
    assert set(np.unique(a_masks)) <= {0.0, 1.0} and a_masks.any()
    plain = make_dataset(built / "seg", "train", batch_size=4, training=False, augment=False)
    plain_images = np.concatenate([x.numpy() for x, _ in plain])
    # augmented images are not any of the plain ones
    assert not any(np.array_equal(a_images[0], p) for p in plain_images)


def test_seed_changes_the_order_and_the_augmentation(built):
    def one_epoch(seed, training=True):
        dataset = make_dataset(built / "seg", "train", batch_size=4, seed=seed, with_ids=True, training=training,
                               augment=training)
        images, ids = {}, []
        for batch, _, batch_ids in dataset:
            for image, image_id in zip(batch.numpy(), batch_ids.numpy()):
                ids.append(image_id.decode())
                images[ids[-1]] = image
        return ids, images

    first_ids, first = one_epoch(1)
    second_ids, second = one_epoch(2)
    plain_ids, _ = one_epoch(1, training=False)
    assert len(plain_ids) >= 8
    assert sorted(first_ids) == sorted(second_ids) == sorted(plain_ids)  # a permutation, nothing lost
    assert first_ids != second_ids and first_ids != plain_ids and second_ids != plain_ids
    # every image is augmented differently under another seed
    assert all(not np.array_equal(first[i], second[i]) for i in first_ids)


def test_augmentation_ranges_recovered_from_the_warped_masks():
    """Rotation ±7°, shift ±5 % and zoom ±10 % (README): the similarity transform of every
    image in a large batch is fitted from where four square marks land in its mask, and the
    fitted angles, shifts and scales must fill those ranges and stay inside them."""
    from caaxr_tf.data.pipeline import augment_batch

    size, count = 128, 256
    marks = [(28, 28), (28, 100), (100, 28), (100, 100)]  # (row, column) centres
    masks = np.zeros((count, size, size, 1), np.float32)
    for row, column in marks:
        masks[:, row - 4 : row + 5, column - 4 : column + 5] = 1.0
    _, warped = augment_batch(tf.fill([count, size, size, 1], 100.0), tf.constant(masks), tf.constant([5, 0], tf.int64))
    warped = warped.numpy()[..., 0]

    rows, columns = np.mgrid[0:size, 0:size]
    source = np.array([[column, row, 1.0] for row, column in marks])
    centre = np.full(2, (size - 1) / 2)
    angles, scales, shifts = [], [], []
    for mask in warped:
        landed = []
        for row, column in marks:  # each mark stays in its own quadrant
            weights = mask * ((rows < size // 2) == (row < size // 2)) * ((columns < size // 2) == (column < size // 2))
            landed.append([(weights * columns).sum() / weights.sum(), (weights * rows).sum() / weights.sum()])
        solution = np.linalg.lstsq(source, np.array(landed), rcond=None)[0]
        linear, offset = solution[:2].T, solution[2]
        # a rotation and a zoom, nothing else: no shear, no flip
        assert abs(linear[0, 0] - linear[1, 1]) < 0.03 and abs(linear[0, 1] + linear[1, 0]) < 0.03
        scales.append(np.sqrt(np.linalg.det(linear)))
        angles.append(np.degrees(np.arctan2(linear[1, 0], linear[0, 0])))
        shifts.append(offset - centre + linear @ centre)
    angles, scales, shifts = np.array(angles), np.array(scales), np.abs(np.array(shifts)) / size
    assert 6.5 < np.abs(angles).max() <= 7.25, (angles.min(), angles.max())
    assert 0.895 <= scales.min() < 0.91 and 1.09 < scales.max() <= 1.105, (scales.min(), scales.max())
    assert np.all(shifts.max(axis=0) > 0.045) and shifts.max() <= 0.05 + 0.25 / size, shifts.max(axis=0)


def test_augmentation_moves_image_and_mask_together_and_is_seeded():
    from caaxr_tf.data.pipeline import augment_batch

    masks = np.zeros((4, 64, 64, 1), np.float32)
    masks[:, 20:40, 10:30] = 1.0
    images = tf.constant(masks * 200.0 + 20.0)
    seed = tf.constant([3, 0], tf.int64)
    out_images, out_masks = augment_batch(images, tf.constant(masks), seed)
    again, _ = augment_batch(images, tf.constant(masks), seed)
    np.testing.assert_array_equal(out_images.numpy(), again.numpy())
    out_images, out_masks = out_images.numpy(), out_masks.numpy()
    assert set(np.unique(out_masks)) <= {0.0, 1.0}
    assert not np.array_equal(out_masks, masks)  # the boxes moved
    for image, mask in zip(out_images[..., 0], out_masks[..., 0].astype(bool)):
        bright = image > (image[mask].mean() + image[~mask].mean()) / 2
        assert (bright & mask).sum() / (bright | mask).sum() > 0.85


def test_consolidation_subset_filter(built):
    summary = json.loads((built / "seg" / "summary.json").read_text())
    dataset = make_dataset(built / "seg", "test", batch_size=4, subset="consolidation")
    assert sum(int(x.shape[0]) for x, _ in dataset) == summary["counts"]["subset_consolidation"]["test"]


def test_detection_targets_are_the_synthetic_boxes_padded(built, tiny_data_root):
    truth = synthetic_images(tiny_data_root)
    dataset = make_dataset(built / "seg", "test", batch_size=3, task="detection", max_boxes=4, with_ids=True)
    checked = 0
    for _, target, ids in dataset:
        assert target["boxes"].shape[1:] == (4, 4) and target["mask"].shape[1:] == (224, 224, 1)
        for boxes, count, image_id in zip(target["boxes"].numpy(), target["num_boxes"].numpy(), ids.numpy()):
            entry = truth[image_id.decode()]
            expected = np.array([[b["y"] / entry["height"], b["x"] / entry["width"],
                                  (b["y"] + b["height"]) / entry["height"], (b["x"] + b["width"]) / entry["width"]]
                                 for b in entry["boxes"]])
            assert 1 <= count == len(expected) <= 4, image_id
            np.testing.assert_allclose(boxes[:count], expected, atol=1e-6)  # (ymin, xmin, ymax, xmax), in order
            assert np.all(boxes[count:] == 0)
            checked += 1
    assert checked == json.loads((built / "seg" / "summary.json").read_text())["counts"]["test"]["lesion"]


def test_clear_errors(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a protocol folder"):
        make_dataset(tmp_path, "train")
    with pytest.raises(ValueError, match="fold 3 does not exist"):
        make_dataset(built / "2class", "train", fold=3)
    with pytest.raises(ValueError, match="unknown split"):
        make_dataset(built / "2class", "dev")
    with pytest.raises(ValueError, match="no masks"):
        make_dataset(built / "2class", "train", task="segmentation")
    with pytest.raises(ValueError, match="unknown subset"):
        make_dataset(built / "2class", "test", subset="consolidation")


def test_file_level_autoshard_policy(built):
    dataset = make_dataset(built / "2class", "train")
    assert dataset.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.FILE
