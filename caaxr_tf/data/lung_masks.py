"""Real lung masks for covid-chestxray: the lungVAE masks of the collection.

``annotations/lungVAE-masks/<image stem>_mask.png`` holds a generated lung mask for some of
the collection's images (Selvan et al.'s lungVAE), resized with nearest neighbour together with
the images, so mask and image sizes match (checked). A mask may also be named
``<image stem>_mask.png.png``; in the collection the four files so named are second masks of
images that also have a ``_mask.png`` (differing from it on 0.3-0.5 % of the pixels): the
``_mask.png`` file is used and the other reported.

`attach_lung_masks` sets ``mask_path`` on the samples of a `ReadResult` (from
``read_covid_chestxray``) and returns only the samples that have a usable mask:

* a sample without a mask is left out and counted: ``excluded["no lung mask"]``;
* a mask whose image is on disk but not among the samples (a lateral view, a CT slice, a
  duplicate row) is counted: ``excluded["lung mask of an image not read"]``;
* a mask without an image, a second mask for one image, an unreadable or non-binary mask
  (caaxr_tf/data/masks.py: 0/255, up to 1 % other values tolerated) and a mask of another
  size than its image are reported as ``Skipped`` (the mask file, field ``mask``) and their
  sample is left out; an unreadable image is reported on the image (field ``image``).
"""

from __future__ import annotations

import os
from pathlib import Path

from caaxr_tf.data.images import load_image
from caaxr_tf.data.masks import MAX_GRAY_FRACTION, check_same_size, read_binary_mask
from caaxr_tf.data.records import InputError, ReadResult, Sample

LUNGVAE_DIR = "annotations/lungVAE-masks"
MASK_SUFFIXES = ("_mask.png", "_mask.png.png")
EXCLUDED_NO_MASK = "no lung mask"
EXCLUDED_IMAGE_NOT_READ = "lung mask of an image not read"


def mask_stem(file_name: str) -> str | None:
    """The image stem a lungVAE mask file belongs to, or None for another file name."""
    for suffix in sorted(MASK_SUFFIXES, key=len, reverse=True):
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)]
    return None


def attach_lung_masks(
    result: ReadResult,
    masks_dir: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    max_gray_fraction: float = MAX_GRAY_FRACTION,
) -> ReadResult:
    """The samples of ``result`` that have a lung mask in ``masks_dir``, with ``mask_path`` set.

    Args:
        result: what the source reader returned; its skipped and excluded entries are kept.
        masks_dir: the folder of ``<image stem>_mask.png`` files.
        images_dir: the collection's image folder; with it, masks of images the reader left
            out are told apart from masks without any image.
        max_gray_fraction: see caaxr_tf/data/masks.py.
    """
    out = ReadResult(skipped=list(result.skipped), excluded=dict(result.excluded))
    masks_dir = Path(masks_dir).resolve()
    if not masks_dir.is_dir():
        out.skip(str(masks_dir), "folder", "lung mask folder not found; no sample has a lung mask")
        out.exclude(EXCLUDED_NO_MASK, len(result.samples))
        return out

    masks: dict[str, Path] = {}
    for path in sorted(masks_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not path.is_file() or path.name.startswith("."):
            continue
        stem = mask_stem(path.name)
        if stem is None:
            out.skip(str(path), "mask", f"not a lung mask file name (<image stem>{MASK_SUFFIXES[0]})")
        elif stem in masks:
            out.skip(str(path), "mask", f"second mask for image stem {stem!r} (first: {masks[stem].name})")
        else:
            masks[stem] = path

    attached: list[Sample] = []
    used: set[str] = set()
    for sample in result.samples:
        stem = Path(sample.path).stem
        mask_path = masks.get(stem)
        if mask_path is None:
            out.exclude(EXCLUDED_NO_MASK)
            continue
        used.add(stem)
        try:
            mask = read_binary_mask(mask_path, max_gray_fraction)
            image = load_image(sample.path)
            check_same_size(str(mask_path), mask, sample.path, image.pixels.shape)
        except InputError as error:
            out.skipped.append(error.as_skipped())
            continue
        attached.append(sample.replace(mask_path=str(mask_path)))

    image_stems: set[str] = set()
    if images_dir is not None and Path(images_dir).is_dir():
        image_stems = {p.stem for p in Path(images_dir).iterdir() if p.is_file()}
    for stem, mask_path in sorted(masks.items()):
        if stem in used:
            continue
        if stem in image_stems:
            out.exclude(EXCLUDED_IMAGE_NOT_READ)
        else:
            out.skip(str(mask_path), "mask", f"lung mask without an image (no image with stem {stem!r})")
    out.samples = attached
    return out
