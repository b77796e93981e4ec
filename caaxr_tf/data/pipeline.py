"""tf.data input pipelines over the TFRecord shards.

Per record: parse → decode PNG (8/16-bit) → contrast inversion where flagged → scale to the
8-bit range → bicubic resize to 224×224 → uint8 (boxes → binary mask for segmentation).
That deterministic part is cached; shuffling, batching, augmentation and prefetching follow.
The same ``preprocess_image`` runs inside exported models, so serving sees what training saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tensorflow as tf

from caaxr_tf.data.tfrecords import feature_spec

IMAGE_SIZE = 224
SPLITS = ("train", "val", "test")
TASKS = ("classification", "segmentation", "detection")


def preprocess_image(encoded: tf.Tensor, bit_depth: tf.Tensor, invert: tf.Tensor, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """Encoded PNG/JPEG bytes → [image_size, image_size, 1] uint8.

    Everything is decoded to uint16 (8-bit data come out multiplied by 257, so their full
    range is 65535 as for 16-bit data); ``bit_depth`` between 9 and 15 (e.g. 12-bit BIMCV)
    sets the range to ``2**bit_depth - 1``. Inversion maps ``v`` to ``range - v``.
    """
    image = tf.io.decode_image(encoded, channels=1, dtype=tf.uint16, expand_animations=False)
    image.set_shape([None, None, 1])
    bit_depth = tf.cast(bit_depth, tf.int32)
    full_range = tf.where(
        (bit_depth > 8) & (bit_depth < 16),
        tf.cast(tf.bitwise.left_shift(1, bit_depth) - 1, tf.float32),
        tf.constant(65535.0),
    )
    pixels = tf.minimum(tf.cast(image, tf.float32), full_range)
    pixels = tf.where(tf.cast(invert, tf.bool), full_range - pixels, pixels)
    pixels = pixels * (255.0 / full_range)
    resized = tf.image.resize(pixels, [image_size, image_size], method="bicubic", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def boxes_to_mask(boxes: tf.Tensor, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """Normalised [N, 4] (xmin, ymin, xmax, ymax) boxes → [S, S, 1] uint8 mask.

    A pixel belongs to a box when its centre lies inside it (left/top edges inclusive).
    """
    centres = (tf.range(image_size, dtype=tf.float32) + 0.5) / image_size
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    inside_x = (centres[None, :] >= boxes[:, 0:1]) & (centres[None, :] < boxes[:, 2:3])  # [N, S]
    inside_y = (centres[None, :] >= boxes[:, 1:2]) & (centres[None, :] < boxes[:, 3:4])
    inside = inside_y[:, :, None] & inside_x[:, None, :]  # [N, S(y), S(x)]
    mask = tf.reduce_any(inside, axis=0)
    return tf.cast(mask, tf.uint8)[:, :, None]


def parse_record(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse one serialized example into dense tensors (boxes as [N, 4] xmin, ymin, xmax, ymax)."""
    parsed = tf.io.parse_single_example(serialized, feature_spec())
    dense = {k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v) for k, v in parsed.items()}
    dense["boxes"] = tf.stack([dense.pop(f"bbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")], axis=-1)
    return dense


def read_summary(tfrecord_dir: str | Path) -> dict[str, Any]:
    path = Path(tfrecord_dir) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {tfrecord_dir} is not a protocol folder written by tools/make_tfrecords.py"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def shard_files(tfrecord_dir: str | Path, split: str, fold: int = 1) -> list[str]:
    """The shard files of one split; a clear error when the split, fold or shards are missing."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    tfrecord_dir = Path(tfrecord_dir)
    summary = read_summary(tfrecord_dir)
    if split != "test" and not 1 <= fold <= int(summary["folds"]):
        raise ValueError(f"fold {fold} does not exist in {tfrecord_dir}: it has folds 1..{summary['folds']}")
    key = "test" if split == "test" else f"fold{fold}/{split}"
    names = summary["shards"].get(key, [])
    files = [str(tfrecord_dir / name) for name in names]
    missing = [f for f in files if not Path(f).exists()]
    if not files or missing:
        what = "no shards" if not files else f"missing shard {missing[0]}"
        raise FileNotFoundError(f"{tfrecord_dir}: {what} for split {key}")
    return files


def _geometric_augmenter(seed: int | None):
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.02, fill_mode="constant", seed=seed),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom((-0.1, 0.1), fill_mode="constant", seed=seed),
        ],
        name="geometric_augmentation",
    )


def _photometric_augmenter(seed: int | None):
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed),
            keras.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed),
        ],
        name="photometric_augmentation",
    )


def make_dataset(
    tfrecord_dir: str | Path,
    split: str,
    *,
    fold: int = 1,
    batch_size: int = 32,
    image_size: int = IMAGE_SIZE,
    task: str | None = None,
    training: bool | None = None,
    augment: bool | None = None,
    cache: bool | str = True,
    shuffle_buffer: int = 2048,
    repeat: bool = False,
    drop_remainder: bool = False,
    subset: str | None = None,
    max_boxes: int = 32,
    seed: int | None = 0,
    deterministic: bool = True,
    with_ids: bool = False,
) -> tf.data.Dataset:
    """Batches of ``(image, target)`` for one protocol split.

    ``image`` is float32 [B, S, S, 1] in 0..255. ``target`` is the one-hot label [B, C] for
    classification, the box mask [B, S, S, 1] (float32 0/1) for segmentation, and for detection
    a dict with ``mask``, ``boxes`` [B, max_boxes, 4] (ymin, xmin, ymax, xmax, normalised, zero
    padded) and ``num_boxes``. ``training`` (default: split == "train") shuffles;
    ``augment`` (default: training) adds random rotation, shift, zoom, contrast and brightness
    (geometric changes are applied to image and mask together). ``subset`` keeps only records of
    a summary subset (e.g. ``consolidation``). ``with_ids`` adds the image ids as a third element.
    """
    summary = read_summary(tfrecord_dir)
    task = task or summary["task"]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task != "classification" and summary["task"] != "segmentation":
        raise ValueError(f"{tfrecord_dir} holds a {summary['task']} protocol; it has no masks for task {task!r}")
    training = split == "train" if training is None else training
    augment = training if augment is None else augment
    num_classes = len(summary["classes"])
    files = shard_files(tfrecord_dir, split, fold)
    subset_findings: list[str] = []
    if subset is not None:
        if subset not in summary.get("subsets", {}):
            raise ValueError(f"unknown subset {subset!r}; {tfrecord_dir} has: {', '.join(summary.get('subsets', {})) or 'none'}")
        subset_findings = [str(f).strip().lower() for f in summary["subsets"][subset].get("findings", [])]

    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    dataset = dataset.map(parse_record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if subset_findings:
        wanted = tf.constant(subset_findings)

        def in_subset(record):
            names = tf.strings.lower(tf.strings.strip(record["bbox/finding"]))
            return tf.reduce_any(tf.equal(names[:, None], wanted[None, :]))

        dataset = dataset.filter(in_subset)

    def deterministic_part(record):
        image = preprocess_image(record["image/encoded"], record["image/bit_depth"], record["image/invert"], image_size)
        out = {"image": image, "label": tf.cast(record["label"], tf.int32), "id": record["image/id"]}
        if task != "classification":
            out["mask"] = boxes_to_mask(record["boxes"], image_size)
        if task == "detection":
            boxes = tf.gather(record["boxes"], [1, 0, 3, 2], axis=-1)[:max_boxes]
            count = tf.shape(boxes)[0]
            out["boxes"] = tf.pad(boxes, [[0, max_boxes - count], [0, 0]])
            out["num_boxes"] = count
        return out

    dataset = dataset.map(deterministic_part, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if cache:
        dataset = dataset.cache("" if cache is True else str(cache))
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)

    geometric = _geometric_augmenter(seed) if augment and task != "detection" else None
    photometric = _photometric_augmenter(seed) if augment else None

    def to_model_inputs(batch):
        image = tf.cast(batch["image"], tf.float32)
        mask = tf.cast(batch["mask"], tf.float32) if "mask" in batch else None
        if geometric is not None:
            if mask is not None:
                both = geometric(tf.concat([image, mask * 255.0], axis=-1), training=True)
                image, mask = both[..., :1], tf.cast(both[..., 1:] >= 127.5, tf.float32)
            else:
                image = geometric(image, training=True)
        if photometric is not None:
            image = tf.clip_by_value(photometric(image, training=True), 0.0, 255.0)
        if task == "classification":
            target = tf.one_hot(batch["label"], num_classes, dtype=tf.float32)
        elif task == "segmentation":
            target = mask
        else:
            target = {"mask": mask, "boxes": batch["boxes"], "num_boxes": batch["num_boxes"]}
        if with_ids:
            return image, target, batch["id"]
        return image, target

    dataset = dataset.map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    return dataset.with_options(options)
