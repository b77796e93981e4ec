"""In-graph input ops of the serving signatures: encoded PNG/JPEG requests decoded and
preprocessed exactly as the tf.data pipeline prepares them, and the shape/range checks of a
client's own preprocessing (moved from ``caaxr_tf.export``, which re-exports them)."""

from __future__ import annotations

import tensorflow as tf

from caaxr_tf.data.pipeline import IMAGE_SIZE, preprocess_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# A PNG starts with the 8-byte signature and the IHDR chunk (length, type, width, height),
# so the bit depth is byte 24.
PNG_BIT_DEPTH_OFFSET = 24
HEADER_BYTES = 32



def image_headers(images: tf.Tensor) -> tf.Tensor:
    """The first ``HEADER_BYTES`` bytes of every encoded image, zero padded: uint8 [N, 32]."""
    padded = tf.strings.join([images, tf.constant(b"\x00" * HEADER_BYTES)])
    return tf.io.decode_raw(tf.strings.substr(padded, 0, HEADER_BYTES), tf.uint8)


def _starts_with(headers: tf.Tensor, signature: bytes) -> tf.Tensor:
    expected = tf.constant(list(signature), dtype=tf.uint8)
    return tf.reduce_all(tf.equal(headers[:, : len(signature)], expected[None, :]), axis=1)


def file_bit_depths(headers: tf.Tensor) -> tf.Tensor:
    """16 for 16-bit PNGs, 8 for everything else (8-bit or lower PNGs decode to 8 bits, JPEG)."""
    is_png = _starts_with(headers, PNG_SIGNATURE)
    sixteen = tf.equal(headers[:, PNG_BIT_DEPTH_OFFSET], 16)
    return tf.where(is_png & sixteen, 16, 8)


def _per_image(values: tf.Tensor, count: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """An empty ``values`` (the signature default) stands for zeros / false for every image."""
    values = tf.cast(values, dtype)
    return tf.cond(
        tf.equal(tf.size(values), 0), lambda: tf.zeros([count], dtype), lambda: values
    )


def decode_images(
    images: tf.Tensor, invert: tf.Tensor, bit_depth: tf.Tensor, image_size: int = IMAGE_SIZE
) -> tf.Tensor:
    """Encoded PNG/JPEG batch -> float32 [N, S, S, 1] in 0..255, exactly as the tf.data pipeline.

    Raises ``InvalidArgumentError`` (at run time) naming the problem for an empty batch, bytes
    that are not PNG or JPEG, ``invert``/``bit_depth`` of the wrong length, and a bit depth
    outside ``0..file depth`` (a JPEG or 8-bit PNG cannot hold 12 significant bits).
    """
    images = tf.convert_to_tensor(images, tf.string)
    # The ranks first: TF Serving does not check a request against the SignatureDef's shapes,
    # and everything below assumes one value per image.
    with tf.control_dependencies(
        [assert_rank_one(images, "images", "encoded PNG or JPEG images"),
         assert_rank_one(invert, "invert", "booleans"),
         assert_rank_one(bit_depth, "bit_depth", "integers")]
    ):
        images = tf.identity(images)
    count = tf.size(images)
    headers = image_headers(images)
    known = _starts_with(headers, PNG_SIGNATURE) | _starts_with(headers, JPEG_SIGNATURE)
    depth = file_bit_depths(headers)
    checks = [
        tf.debugging.assert_greater(
            count, 0, message="empty batch: `images` must hold at least one encoded PNG or JPEG image"
        ),
        tf.debugging.Assert(
            tf.reduce_all(known),
            ["`images` must be encoded PNG or JPEG images; not an image at index:", tf.where(~known)[:, 0]],
        ),
    ]
    for name, values in (("invert", invert), ("bit_depth", bit_depth)):
        size = tf.size(values)
        checks.append(
            tf.debugging.Assert(
                tf.equal(size, 0) | tf.equal(size, count),
                [f"`{name}` must be empty or hold one value per image; images:", count, f"{name}:", size],
            )
        )
    with tf.control_dependencies(checks):
        images = tf.identity(images)
        invert = _per_image(invert, count, tf.bool)
        bit_depth = _per_image(bit_depth, count, tf.int32)
    valid_depth = tf.equal(bit_depth, 0) | ((bit_depth >= 1) & (bit_depth <= depth))
    with tf.control_dependencies(
        [
            tf.debugging.Assert(
                tf.reduce_all(valid_depth),
                [
                    "`bit_depth` must be 0 (the file's own depth) or 1..16 for 16-bit PNGs, 1..8 for "
                    "JPEG and 8-bit PNGs; bad values at index:",
                    tf.where(~valid_depth)[:, 0],
                    "given:",
                    tf.boolean_mask(bit_depth, ~valid_depth),
                ],
                summarize=16,
            )
        ]
    ):
        bit_depth = tf.where(tf.equal(bit_depth, 0), depth, bit_depth)

    def preprocess(args: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tf.Tensor:
        encoded, flag, bits = args
        return preprocess_image(encoded, bits, flag, image_size)

    pixels = tf.map_fn(
        preprocess,
        (images, invert, bit_depth),
        fn_output_signature=tf.TensorSpec([image_size, image_size, 1], tf.uint8),
    )
    return tf.cast(pixels, tf.float32)


def runtime_shape(values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(shape, rank)`` of ``values`` as the request delivers them.

    A signature input keeps the static rank of its TensorSpec, so ``tf.rank`` and
    ``tf.size(tf.shape(x))`` are folded to constants when the graph is built, while TF Serving
    and a SavedModel's flat signature feed tensors of any shape. Masking the shape with a
    condition known only at run time keeps its length, the true rank, out of the folding."""
    shape = tf.shape(values)
    return shape, tf.size(tf.boolean_mask(shape, shape >= 0))


def assert_rank_one(values: tf.Tensor, name: str, what: str) -> tf.Operation:
    """An op failing with INVALID_ARGUMENT unless ``values`` is a 1-D batch ``[N]``."""
    shape, rank = runtime_shape(values)
    return tf.debugging.Assert(
        tf.equal(rank, 1), [f"`{name}` must be a 1-D batch [N] of {what}; got shape", shape], summarize=8
    )


def assert_image_shape(images: tf.Tensor, image_size: int) -> tf.Operation:
    """An op failing with INVALID_ARGUMENT unless ``images`` is ``[N, S, S, 1]``.

    Checked in the graph because neither TF Serving nor a SavedModel's flat signature checks a
    request's shape, and a wrong one reaches the convolutions (oneDNN then aborts, or not,
    depending on the CPU)."""
    shape, rank = runtime_shape(images)
    padded = tf.concat([shape, tf.zeros([4], tf.int32)], axis=0)  # defined for any rank
    valid = tf.equal(rank, 4) & tf.reduce_all(tf.equal(padded[1:4], [image_size, image_size, 1]))
    return tf.debugging.Assert(
        valid, [f"`images` must have shape [N, {image_size}, {image_size}, 1]; got shape", shape], summarize=8
    )


def check_preprocessed(images: tf.Tensor, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """Pass ``images`` through after checking its shape, that the batch is non-empty and that
    the values lie within 0..255."""
    with tf.control_dependencies([assert_image_shape(images, image_size)]):
        images = tf.identity(images)
    checks = [
        tf.debugging.assert_greater(
            tf.shape(images)[0], 0, message="empty batch: `images` must hold at least one image"
        ),
        tf.debugging.Assert(
            tf.reduce_all((images >= 0.0) & (images <= 255.0)),
            [
                "`images` must hold pixel values in 0..255 (float32, not normalised); min, max:",
                tf.reduce_min(images),
                tf.reduce_max(images),
            ],
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(images)
