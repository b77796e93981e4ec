"""tf.data input pipelines over the TFRecord shards.

Per record: parse → the task's ``decode`` (for every task: decode PNG/JPEG (8/16-bit) →
bicubic resize to 224×224 → contrast inversion where flagged → scale to the 8-bit range →
uint8; then what its target needs: a mask from the boxes or from the record's mask, padded
boxes, float targets). That deterministic part is cached; shuffling, batching, the task's
augmentation, its target and prefetching follow. The same ``preprocess_image`` runs inside
exported models, so serving sees what training saw.

This module is the reading side: it imports TensorFlow and the record schema — neither the
shard writer, OpenCV nor the task registry (the caller builds the Task;
`caaxr_tf.tasks.datasets.make_dataset` resolves a task name or the protocol's own task).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import tensorflow as tf

from caaxr_tf.data.schema import SPLITS, feature_spec, read_summary, shard_files, split_members  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from caaxr_tf.tasks.base import Task

IMAGE_SIZE = 224


def decode_uint16(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG bytes → [H, W, 1] uint16; 8-bit data are multiplied by 257 (255 → 65535).

    JPEG is decoded as uint8 and widened here: ``tf.io.decode_image(dtype=tf.uint16)`` would
    multiply JPEG data by 256, so white would end at 65280 and come out as 254.
    """

    def jpeg() -> tf.Tensor:
        # the accurate integer IDCT, as libjpeg (OpenCV, PIL) uses by default; TF defaults to the fast one
        pixels = tf.io.decode_jpeg(encoded, channels=1, dct_method="INTEGER_ACCURATE")
        return tf.cast(pixels, tf.uint16) * tf.constant(257, tf.uint16)

    def other() -> tf.Tensor:
        return tf.io.decode_image(encoded, channels=1, dtype=tf.uint16, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 1])
    return image


def preprocess_image(encoded: tf.Tensor, bit_depth: tf.Tensor, invert: tf.Tensor, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """Encoded PNG/JPEG bytes → [image_size, image_size, 1] uint8.

    Everything is decoded to uint16 (8-bit data come out multiplied by 257, so their full
    range is 65535 as for 16-bit data); ``bit_depth`` between 9 and 15 (e.g. 12-bit BIMCV)
    sets the range to ``2**bit_depth - 1``. Inversion maps ``v`` to ``range - v``.

    The antialiased bicubic resize runs first, on the raw values: it is linear with weights
    summing to one, so clamping, inverting and scaling afterwards gives the same image (to
    float rounding) for a fraction of the work on large inputs.
    """
    image = decode_uint16(encoded)
    bit_depth = tf.cast(bit_depth, tf.int32)
    full_range = tf.where(
        (bit_depth > 8) & (bit_depth < 16),
        tf.cast(tf.bitwise.left_shift(1, bit_depth) - 1, tf.float32),
        tf.constant(65535.0),
    )
    resized = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], method="bicubic", antialias=True)
    pixels = tf.clip_by_value(resized, 0.0, full_range)
    pixels = tf.where(tf.cast(invert, tf.bool), full_range - pixels, pixels)
    return tf.cast(tf.round(tf.clip_by_value(pixels * (255.0 / full_range), 0.0, 255.0)), tf.uint8)


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


def decode_mask(encoded: tf.Tensor, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """A record's PNG mask → [S, S, 1] uint8 0/1 (nearest-neighbour resize: a mask stays binary);
    an empty string (no mask: e.g. a control image) gives an empty mask."""

    def decoded() -> tf.Tensor:
        mask = tf.io.decode_png(encoded, channels=1)
        mask = tf.image.resize(tf.cast(mask > 0, tf.uint8), [image_size, image_size], method="nearest")
        return tf.cast(mask, tf.uint8)

    mask = tf.cond(tf.equal(tf.strings.length(encoded), 0),
                   lambda: tf.zeros([image_size, image_size, 1], tf.uint8), decoded)
    mask.set_shape([image_size, image_size, 1])
    return mask


def decode_common(record: dict[str, tf.Tensor], image_size: int = IMAGE_SIZE) -> dict[str, tf.Tensor]:
    """What every task keeps of a parsed record: the preprocessed image, the label and the id."""
    image = preprocess_image(record["image/encoded"], record["image/bit_depth"], record["image/invert"], image_size)
    return {"image": image, "label": tf.cast(record["label"], tf.int32), "id": record["image/id"]}


def parse_record(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse one serialized example into dense tensors (boxes as [N, 4] xmin, ymin, xmax, ymax)."""
    parsed = tf.io.parse_single_example(serialized, feature_spec())
    dense = {k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v) for k, v in parsed.items()}
    dense["boxes"] = tf.stack([dense.pop(f"bbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")], axis=-1)
    return dense


# Augmentation ranges: rotation in degrees, shift and zoom as fractions of the image size,
# contrast as a factor range around 1, brightness as a fraction of 255.
ROTATION_DEGREES = 7.0
SHIFT = 0.05
ZOOM = 0.1
CONTRAST = 0.2
BRIGHTNESS = 0.1


def augment_batch(images: tf.Tensor, masks: tf.Tensor | None, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Random rotation, shift and zoom (images and masks alike) and contrast/brightness (images).

    Stateless: the same ``seed`` (shape [2]) gives the same transforms, so a seeded pipeline
    is reproducible even with parallel map calls. Masks use nearest-neighbour sampling.
    """
    batch = tf.shape(images)[0]
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)

    def uniform(index: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([batch], seeds[index], low, high)

    angle = uniform(0, -ROTATION_DEGREES, ROTATION_DEGREES) * (3.141592653589793 / 180.0)
    shift_x = uniform(1, -SHIFT, SHIFT) * width
    shift_y = uniform(2, -SHIFT, SHIFT) * height
    scale = uniform(3, 1.0 - ZOOM, 1.0 + ZOOM)
    # Each transform maps an output pixel (x, y) back to the input pixel it samples.
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    a0, a1 = tf.cos(angle) / scale, tf.sin(angle) / scale
    b0, b1 = -tf.sin(angle) / scale, tf.cos(angle) / scale
    a2 = cx - a0 * (cx + shift_x) - a1 * (cy + shift_y)
    b2 = cy - b0 * (cx + shift_x) - b1 * (cy + shift_y)
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    output_shape = tf.shape(images)[1:3]

    def warp(tensor: tf.Tensor, interpolation: str) -> tf.Tensor:
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=tensor, transforms=transforms, output_shape=output_shape,
            interpolation=interpolation, fill_mode="CONSTANT", fill_value=0.0,
        )

    images = warp(images, "BILINEAR")
    if masks is not None:
        masks = warp(masks, "NEAREST")
    contrast = uniform(4, 1.0 - CONTRAST, 1.0 + CONTRAST)[:, None, None, None]
    brightness = uniform(5, -BRIGHTNESS, BRIGHTNESS)[:, None, None, None] * 255.0
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = tf.clip_by_value((images - mean) * contrast + mean + brightness, 0.0, 255.0)
    return images, masks


def balanced_repeats(class_counts: Sequence[int]) -> list[float]:
    """Per-class oversampling factors that make every class as frequent as the largest one
    (0 for an absent class)."""
    largest = max(class_counts, default=0)
    return [largest / count if count > 0 else 0.0 for count in class_counts]


def repeat_by_class(dataset: tf.data.Dataset, class_repeats: Sequence[float]) -> tf.data.Dataset:
    """Each record of class ``c`` appears ``floor(r_c)`` or ``floor(r_c) + 1`` times, so that a
    class is ``r_c`` times as frequent on average (``r_c`` = ``class_repeats[c]``).

    Which images get the extra copy is decided by a hash of the image id: the same on every
    worker, run and epoch, with no random source in the pipeline. A random source
    (``sample_from_datasets``, ``rejection_resample``) or any stateful step (``scan``) stops
    tf.data's file-level auto-sharding, which multi-worker training relies on. The copies are
    spread by the shuffle that follows and made different by augmentation.
    """
    factors = tf.constant(list(class_repeats), tf.float32)

    def copies(record) -> tf.Tensor:
        factor = tf.gather(factors, record["label"])
        whole = tf.floor(factor)
        draw = tf.cast(tf.strings.to_hash_bucket_fast(record["id"], 1 << 30), tf.float32) / float(1 << 30)
        return tf.cast(whole, tf.int64) + tf.cast(draw < factor - whole, tf.int64)

    return dataset.flat_map(lambda record: tf.data.Dataset.from_tensors(record).repeat(copies(record)))


def member_filter(image_ids: Sequence[str]):
    """A ``Dataset.filter`` predicate keeping parsed records whose ``image/id`` is in ``image_ids``
    (the folds of ``grouped_halves`` protocols share one set of shards)."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(list(image_ids) or [""], tf.string),
                                            tf.ones([max(len(image_ids), 1)], tf.int64)), default_value=0)
    if not image_ids:
        return lambda record: tf.constant(False)
    return lambda record: tf.equal(table.lookup(record["image/id"]), 1)


def make_dataset(
    tfrecord_dir: str | Path,
    split: str,
    *,
    fold: int = 1,
    batch_size: int = 32,
    image_size: int = IMAGE_SIZE,
    task: "Task",
    training: bool | None = None,
    augment: bool | None = None,
    cache: bool | str = True,
    shuffle_buffer: int = 2048,
    repeat: bool = False,
    drop_remainder: bool = False,
    subset: str | None = None,
    seed: int | None = 0,
    deterministic: bool = True,
    with_ids: bool = False,
    class_repeats: Sequence[float] | None = None,
) -> tf.data.Dataset:
    """Batches of ``(image, target)`` for one protocol split.

    ``image`` is float32 [B, S, S, 1] in 0..255 (the CT task: raw values). ``target`` is what
    the task trains on: the one-hot label [B, C] for classification, the mask [B, S, S, 1]
    (float32 0/1) for segmentation, for detection a dict with ``mask``, ``boxes``
    [B, max_boxes, 4] (ymin, xmin, ymax, xmax, normalised, zero padded) and ``num_boxes``.
    ``task`` is the Task object whose ``decode``/``augment``/``target`` shape the batches (built
    by the caller; `caaxr_tf.tasks.datasets.make_dataset` also takes a task name or None).
    ``training`` (default: split == "train") shuffles; ``augment`` (default: training, where
    the task supports it) applies the task's augmentation (see ``augment_batch``: random
    rotation, shift, zoom, contrast and brightness; geometric changes move image and mask
    together). ``subset`` keeps only records of a summary subset (e.g. ``consolidation``).
    On a ``grouped_halves`` protocol (severity) every fold reads the same shards and keeps the
    records its summary.json ``split_members`` list for (split, fold). ``with_ids`` adds the
    image ids as a third element. ``class_repeats`` (one factor per
    class, see ``repeat_by_class``) oversamples classes after the cache: balanced sampling for
    imbalanced training splits.
    """
    if task is None or isinstance(task, str):
        raise TypeError("make_dataset needs a Task object; caaxr_tf.tasks.datasets.make_dataset resolves "
                        f"a task name or the protocol's own task (got {task!r})")
    summary = read_summary(tfrecord_dir)
    training = split == "train" if training is None else training
    augment = (training and task.supports_augmentation) if augment is None else augment
    if augment and not task.supports_augmentation:
        raise ValueError(f"augmentation is not supported for the {task.name} task (its targets would not follow)")
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
    members = split_members(summary, split, fold)
    if members is not None:
        dataset = dataset.filter(member_filter(members))
    if subset_findings:
        wanted = tf.constant(subset_findings)

        def in_subset(record):
            names = tf.strings.lower(tf.strings.strip(record["bbox/finding"]))
            return tf.reduce_any(tf.equal(names[:, None], wanted[None, :]))

        dataset = dataset.filter(in_subset)

    dataset = dataset.map(lambda record: task.decode(record, image_size), num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=deterministic)
    if cache:
        dataset = dataset.cache("" if cache is True else str(cache))
    if class_repeats is not None:
        if len(class_repeats) != num_classes:
            raise ValueError(f"class_repeats has {len(class_repeats)} factors for {num_classes} classes")
        dataset = repeat_by_class(dataset, class_repeats)
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
    base_seed = tf.constant(0 if seed is None else seed, tf.int64)

    def to_model_inputs(batch):
        batch = dict(batch)
        image = tf.cast(batch["image"], tf.float32)
        if augment:
            # The batch's seed comes from its image ids, which the shuffle changes every epoch.
            # (A second random source zipped in would stop file-level auto-sharding.)
            ids = tf.strings.reduce_join(batch["id"], separator="|")
            batch_seed = tf.stack([base_seed, tf.strings.to_hash_bucket_fast(ids, 2**62)])
            image, changed = task.augment(image, batch, batch_seed)
            batch.update(changed)
        target = task.target(batch)
        if with_ids:
            return image, target, batch["id"]
        return image, target

    dataset = dataset.map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    return dataset.with_options(options)
