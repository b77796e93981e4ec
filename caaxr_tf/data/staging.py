"""Decoding, checking and re-encoding one image (and its mask) for the TFRecord shards.

Runs in worker processes, so it imports no TensorFlow. Each image is decoded once and checked
(bit depth, boxes inside the image). A greyscale PNG or JPEG that already fits the storage size
is kept as it is: the shard writer copies the source file's bytes into the records. Any other
image (a larger one, colour, DICOM, a 16-bit TIFF CT slice) is shrunk to the storage size where
needed and written as PNG into a staging folder. A sample's pixel mask (``mask_path``) is read
with ``masks.read_binary_mask``, checked against the image's size, resized with nearest
neighbour to the stored size and written as a 0/255 PNG beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from caaxr_tf.data.images import LoadedImage, encode_png, load_image, resize_long_side, resize_mask
from caaxr_tf.data.masks import check_same_size, read_binary_mask
from caaxr_tf.data.records import InputError, Sample, Skipped
from caaxr_tf.io import atomic_path


@dataclass
class StagedImage:
    """What the shard writer needs about one staged image. Boxes are normalised to [0, 1]."""

    image_id: str
    encoded_path: str  # the bytes to store: a staged PNG, or the source file itself
    bit_depth: int
    original_height: int
    original_width: int
    height: int
    width: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    box_findings: list[str] = field(default_factory=list)
    format: str = "png"  # "png" or "jpeg"
    mask_path: str = ""  # the staged 0/255 PNG mask at the stored size; "" when the sample has none


# Staged metadata of another version is staged again (3: keyed by staging_key; 4: masks, and
# staged files named by staging_id).
STAGING_VERSION = 4


def staging_id(sample: Sample) -> str:
    """What identifies a staged image: the image id and the sample fields staging reads (path,
    bit depth, boxes, mask). One image read by two sources with other boxes or a mask (e.g.
    covid-chestxray and covid-chestxray-lungs) is staged once for each."""
    payload = [sample.image_id, os.path.abspath(sample.path), sample.bit_depth,
               [[box.xmin, box.ymin, box.xmax, box.ymax, box.finding] for box in sample.boxes],
               os.path.abspath(sample.mask_path) if sample.mask_path else ""]
    return json.dumps(payload, default=str)


def staged_name(sample: Sample) -> str:
    return hashlib.sha1(staging_id(sample).encode("utf-8")).hexdigest()[:24]


def effective_bit_depth(path: str, pixels: np.ndarray, decoded_bits: int, stored_bits: int | None) -> int:
    """Bits per pixel to scale by: the sidecar's BitsStored when given, checked against the data."""
    if stored_bits is None:
        return decoded_bits
    if not 1 <= stored_bits <= 16:
        raise InputError(path, "bit_depth", f"BitsStored {stored_bits} is outside 1..16")
    if stored_bits > decoded_bits:
        raise InputError(path, "bit_depth", f"BitsStored is {stored_bits} but the image holds {decoded_bits}-bit pixels")
    if stored_bits < decoded_bits and int(pixels.max(initial=0)) > (1 << stored_bits) - 1:
        raise InputError(
            path, "bit_depth", f"pixel values up to {int(pixels.max())} exceed BitsStored {stored_bits}"
        )
    return stored_bits


def check_boxes(sample: Sample, height: int, width: int) -> tuple[list, list[str], list[Skipped]]:
    """Normalise boxes lying inside the image; report the others."""
    boxes, findings, dropped = [], [], []
    for index, box in enumerate(sample.boxes):
        values = (box.xmin, box.ymin, box.xmax, box.ymax)
        field_name = f"box {index} ({box.finding})"
        if any(v is None or not np.isfinite(v) for v in values):
            dropped.append(Skipped(sample.path, field_name, f"non-numeric coordinates {values}"))
        elif box.xmin < 0 or box.ymin < 0 or box.xmax > width or box.ymax > height:
            dropped.append(
                Skipped(sample.path, field_name, f"box {values} lies outside the {width}x{height} image")
            )
        elif box.xmax <= box.xmin or box.ymax <= box.ymin:
            dropped.append(Skipped(sample.path, field_name, f"empty box {values}"))
        else:
            boxes.append((box.xmin / width, box.ymin / height, box.xmax / width, box.ymax / height))
            findings.append(box.finding)
    return boxes, findings, dropped


def _write_atomic(path: str, data: bytes) -> None:
    """Write a staged file under a temporary name and rename it (``caaxr_tf.io.atomic_path``):
    a disk full or an interruption leaves no partial file behind. No fsync: a staged file is
    a cache that a rerun checks by its key."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)


def file_state(path: str) -> list[int] | None:
    """A file's size, modification time and inode (None when it cannot be read)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def staging_key(sample: Sample, storage_size: int) -> str:
    """Everything the staged bytes and metadata depend on: the staging code's version, the
    storage size, the source file's identity and state (path, size, modification time,
    inode), the sample fields staging reads (bit depth, boxes) and the mask file's path and
    state. A staged entry with another key is staged again."""
    payload = [
        STAGING_VERSION, int(storage_size), os.path.abspath(sample.path), file_state(sample.path), sample.image_id,
        sample.bit_depth, [[box.xmin, box.ymin, box.xmax, box.ymax, box.finding] for box in sample.boxes],
    ]
    if sample.mask_path:
        payload.append([os.path.abspath(sample.mask_path), file_state(sample.mask_path)])
    return hashlib.sha256(json.dumps(payload, default=str).encode("utf-8")).hexdigest()


def keeps_source_bytes(loaded: LoadedImage, storage_size: int) -> bool:
    """True when the records store the file's own bytes: plain grey PNG/JPEG needing no shrinking."""
    return loaded.encoded is not None and (storage_size <= 0 or max(loaded.height, loaded.width) <= storage_size)


def _load(sample: Sample) -> LoadedImage:
    """A COVID-CTset slice is decoded by the CT reader, which checks it whatever the reader's
    ``check_headers`` said (16-bit, one channel, 512x512: a slice of another size would be
    stretched to the square input); every other image by ``load_image``."""
    from caaxr_tf.data.sources.covid_ctset import SOURCE as CT_SOURCE

    if sample.source == CT_SOURCE:
        from caaxr_tf.data.ct_series import read_ct_tiff  # pydicom: only for CT, not in every worker's start-up

        return LoadedImage(read_ct_tiff(sample.path), 16)
    return load_image(sample.path)


def stage_image(sample: Sample, staging_dir: str, storage_size: int) -> tuple[StagedImage | None, list[Skipped]]:
    """Decode, check and store one image. Returns the staged image (None if it is unusable)
    and everything that was dropped on the way."""
    name = staged_name(sample)
    meta_path = os.path.join(staging_dir, name + ".json")
    key = staging_key(sample, storage_size)
    if os.path.exists(meta_path):  # staged by an earlier, interrupted run
        try:
            with open(meta_path, encoding="utf-8") as handle:
                meta = json.load(handle)
            if meta.get("version") == STAGING_VERSION and meta.get("key") == key:
                return StagedImage(**meta["staged"]), [Skipped(**s) for s in meta["dropped"]]
        except (OSError, ValueError, TypeError, KeyError):
            pass  # unreadable or of another layout: stage again
    try:
        loaded = _load(sample)
        bits = effective_bit_depth(sample.path, loaded.pixels, loaded.bit_depth, sample.bit_depth)
        mask = None
        if sample.mask_path:
            # The source's reader checked that the mask is binary, with its configured tolerance
            # (e.g. qata.max_gray_fraction); here it is only binarised, the same way.
            mask = read_binary_mask(sample.mask_path, max_gray_fraction=1.0)
            check_same_size(sample.mask_path, mask, sample.path, loaded.pixels.shape)
    except InputError as error:
        return None, [error.as_skipped()]
    boxes, findings, dropped = check_boxes(sample, loaded.height, loaded.width)
    pixels = resize_long_side(loaded.pixels, storage_size)
    if keeps_source_bytes(loaded, storage_size):
        encoded_path, encoded_format = os.path.abspath(sample.path), loaded.format or "png"
    else:
        encoded_path, encoded_format = os.path.join(staging_dir, name + ".png"), "png"
        _write_atomic(encoded_path, encode_png(pixels))
    staged_mask = ""
    if mask is not None:
        staged_mask = os.path.join(staging_dir, name + ".mask.png")
        _write_atomic(staged_mask, encode_png(resize_mask(mask, int(pixels.shape[0]), int(pixels.shape[1]))))
    staged = StagedImage(
        image_id=sample.image_id,
        encoded_path=encoded_path,
        format=encoded_format,
        bit_depth=bits,
        original_height=loaded.height,
        original_width=loaded.width,
        height=int(pixels.shape[0]),
        width=int(pixels.shape[1]),
        boxes=boxes,
        box_findings=findings,
        mask_path=staged_mask,
    )
    meta = {"version": STAGING_VERSION, "key": key, "staged": asdict(staged), "dropped": [d.as_dict() for d in dropped]}
    _write_atomic(meta_path, json.dumps(meta).encode("utf-8"))
    return staged, dropped


def init_stage_worker() -> None:
    """Initializer of a staging process: OpenCV on one thread. With its default thread pool
    (one thread per core) in every worker, two workers on two cores spin against each other
    and each image costs 1.7x the CPU time it costs alone."""
    import cv2

    cv2.setNumThreads(1)


def stage_task(task: tuple[Sample, str, int]) -> tuple[str, StagedImage | None, list[Skipped]]:
    """Picklable entry point for a process pool; returns the sample's ``staging_id``."""
    sample, staging_dir, storage_size = task
    staged, dropped = stage_image(sample, staging_dir, storage_size)
    return staging_id(sample), staged, dropped
