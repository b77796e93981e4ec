"""The ``covid-chestxray-lungs`` source: covid-chestxray images with their lungVAE lung masks.

``annotations/lungVAE-masks/<image stem>_mask.png`` holds a generated lung mask for some of
the collection's images (Selvan et al.'s lungVAE), resized with nearest neighbour together with
the images, so mask and image sizes match (checked). A mask may also be named
``<image stem>_mask.png.png``; in the collection the four files so named are second masks of
images that also have a ``_mask.png`` (differing from it on 0.3-0.5 % of the pixels): the
``_mask.png`` file is used and the other reported.

The source reads the collection (``read_covid_chestxray``: frontal X-rays, findings, lung
boxes), then `attach_lung_masks` sets ``mask_path`` on its samples and keeps only the samples
that have a usable mask. The mask folder comes from the ``covid_chestxray_lungs`` section of
caaxr_tf/configs/data.yaml, the collection's layout from its ``covid_chestxray`` section:

* a sample without a mask is left out and counted: ``excluded["no lung mask"]``;
* a mask whose image is on disk but not among the samples (a lateral view, a CT slice, a
  duplicate row) is counted: ``excluded["lung mask of an image not read"]``;
* a mask without an image, a second mask for one image, an unreadable or non-binary mask
  (caaxr_tf/data/masks.py: 0/255, up to 1 % other values tolerated) and a mask of another
  size than its image are reported as ``Skipped`` (the mask file, field ``mask``) and their
  sample is left out; an unreadable image is reported on the image (field ``image``);
* a file in the mask folder that is not a regular file (a FIFO is never opened) is reported
  (field ``file``); an empty lung mask is used, with a warning naming it
  (``ReadResult.warnings``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from caaxr_tf.data.formats import check_regular_file
from caaxr_tf.data.images import load_image
from caaxr_tf.data.masks import MAX_GRAY_FRACTION, check_same_size, read_binary_mask
from caaxr_tf.data.records import InputError, ReadResult, Sample
from caaxr_tf.data.sources import coerce_sections, register_source, resolve_root
from caaxr_tf.data.sources.covid_chestxray import CovidChestxrayConfig, collection_paths, read_covid_chestxray

SOURCE = "covid-chestxray-lungs"
LUNGVAE_DIR = "annotations/lungVAE-masks"
MASK_SUFFIXES = ("_mask.png", "_mask.png.png")
EXCLUDED_NO_MASK = "no lung mask"
EXCLUDED_IMAGE_NOT_READ = "lung mask of an image not read"


@dataclass(frozen=True)
class LungMasksConfig:
    """The ``covid_chestxray_lungs`` section of caaxr_tf/configs/data.yaml.

    Attributes:
        masks: the folder of ``<image stem>_mask.png`` files, relative to the collection folder.
        max_gray_fraction: share of a mask's pixels that may be neither 0 nor the foreground
            level (see caaxr_tf/data/masks.py).
    """

    masks: str = LUNGVAE_DIR
    max_gray_fraction: float = field(default=MAX_GRAY_FRACTION, metadata={"min": 0.0, "finite": True})


@dataclass(frozen=True)
class LungsSourceConfig:
    """What the ``covid-chestxray-lungs`` source reads: its own section and the collection's."""

    covid_chestxray_lungs: LungMasksConfig = field(default_factory=LungMasksConfig)
    covid_chestxray: CovidChestxrayConfig = field(default_factory=CovidChestxrayConfig)


@register_source(SOURCE, section=("covid_chestxray_lungs", "covid_chestxray"), config=LungsSourceConfig)
def read(data_root: str | os.PathLike, config: LungsSourceConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """covid-chestxray frontal X-rays that have a lungVAE lung mask, with ``mask_path`` set."""
    config = coerce_sections(LungsSourceConfig, config)
    root = resolve_root(data_root, config.covid_chestxray.root)
    read_result = read_covid_chestxray(root, config.covid_chestxray)
    _, images_dir = collection_paths(root, config.covid_chestxray)
    masks = config.covid_chestxray_lungs
    return attach_lung_masks(read_result, Path(root).resolve() / masks.masks, images_dir, masks.max_gray_fraction)


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
    out = ReadResult(skipped=list(result.skipped), excluded=dict(result.excluded), warnings=list(result.warnings))
    masks_dir = Path(masks_dir).resolve()
    if not masks_dir.is_dir():
        out.skip(str(masks_dir), "folder", "lung mask folder not found; no sample has a lung mask")
        out.exclude(EXCLUDED_NO_MASK, len(result.samples))
        return out

    masks: dict[str, Path] = {}
    for path in sorted(masks_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not path.is_file():  # a FIFO, socket, device or broken link: named, never opened
            try:
                check_regular_file(path, "file")
            except InputError as error:
                out.skipped.append(error.as_skipped())
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
        if not mask.any():
            out.warn(str(mask_path), "mask", f"empty lung mask (no lung pixel) for {Path(sample.path).name}; "
                     "used as it is")
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
