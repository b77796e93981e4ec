"""The tf.data pipeline: decoding, inversion, scaling, resizing, masks, batching and errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.pipeline import boxes_to_mask, make_dataset, parse_record, preprocess_image


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


def test_detection_targets_pad_boxes(built):
    dataset = make_dataset(built / "seg", "test", batch_size=3, task="detection", max_boxes=4)
    _, target = next(iter(dataset))
    assert target["boxes"].shape == (3, 4, 4) and target["mask"].shape == (3, 224, 224, 1)
    num = target["num_boxes"].numpy()
    boxes = target["boxes"].numpy()
    for i, n in enumerate(num):
        assert np.all(boxes[i, n:] == 0) and np.all(boxes[i, :n, 2] > boxes[i, :n, 0])


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
