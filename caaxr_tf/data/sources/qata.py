"""The ``qata`` source: QaTa-COV19 COVID-19 chest X-rays with infection masks, and control images.

The release (Degerli et al., 2021; Kaggle "QaTa-COV19 Dataset" by Aysen Degerli) is laid out as::

    QaTa-COV19/
      QaTa-COV19-v1/                 4,603 COVID-19 images, 2,951 of them with a mask
        Images/<name>.png
        Ground-truths/mask_<name>.png
      QaTa-COV19-v2/                 9,258 COVID-19 images, all with masks
        Train Set/Images/<name>.png
        Train Set/Ground-truths/mask_<name>.png
        Test Set/Images/... , Test Set/Ground-truths/...

Control images (no COVID-19, empty infection mask) sit in folders of their own without
masks. ``root`` is the folder that holds the COVID-19 sets; `QataConfig` (the ``qata`` section
of caaxr_tf/configs/data.yaml) names the folders (defaults: the v2 layout, ``--data-root`` pointing at
``QaTa-COV19-v2``; for v1 use ``covid_sets: ["."]``).
The control folders are searched recursively; their names in the public release could not
be checked here, so ``control_dirs`` defaults to ``("Control_Group",)`` and should be set to
wherever the controls are.

Every ``<name>`` in an images folder is a COVID-19 image; its mask is
``<masks_dir>/<mask_prefix><name>`` (or the same name with a ``.png`` suffix when the image is a
JPEG). Samples: ``source="qata"``, ``image_id`` = the file name, ``patient_id`` = the image id
(QaTa-COV19 publishes no patient ids, so every image is its own group), ``labels =
{"COVID-19": 1.0 or 0.0}``, ``findings = ("COVID-19",)`` or ``("control",)``, ``mask_path`` set
for COVID-19 images and ``""`` for controls, whose ground truth is an empty mask.

Bad inputs are reported as ``Skipped`` (file, field) and the rest is read:

* an unreadable, empty or truncated image: the image, field ``image``;
* a COVID-19 image without a mask: the image, field ``mask``;
* a mask without an image, a mask of another size than its image, an unreadable mask, a mask
  that is not binary (see caaxr_tf/data/masks.py: 0 and 255 (or 1); up to 1 % other values
  tolerated and binarised at 128): the mask, field ``mask``;
* a file in an images/masks folder that is not a PNG/JPEG by name, or not a regular file (a
  FIFO is never opened; a broken link is named): the file, field ``file``;
* a file named like a mask (``mask_prefix``) in a control folder: the file, field ``file``;
* a configured folder that does not exist: the folder, field ``folder``.

An empty infection mask of a COVID-19 image is used, with a warning naming it
(``ReadResult.warnings``). With v1, the 1,652 COVID-19 images that have no mask by design are reported as "without a
mask" like any other. A root holding none of the configured folders raises ``SchemaError``.
Every image and mask is decoded once (sizes, binariness and truncation are checked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from caaxr_tf.data.formats import check_regular_file
from caaxr_tf.data.images import load_image
from caaxr_tf.data.masks import MAX_GRAY_FRACTION, check_same_size, read_binary_mask
from caaxr_tf.data.records import InputError, ReadResult, Sample, SchemaError, check_unique_ids
from caaxr_tf.data.sources import coerce_config, register_source, resolve_root

SOURCE = "qata"
COVID_LABEL = "COVID-19"
CONTROL_FINDING = "control"


@dataclass(frozen=True)
class QataConfig:
    """The ``qata`` section of caaxr_tf/configs/data.yaml: where a QaTa-COV19 tree keeps its files.

    Attributes:
        root: the folder holding the sets, relative to the data root unless absolute.
        covid_sets: folders (relative to ``root``) each holding ``images_dir`` and
            ``masks_dir`` (``"."`` = the root).
        images_dir: name of the images folder of a set.
        masks_dir: name of the ground-truth folder of a set.
        mask_prefix: a mask is named ``mask_prefix + <image file name>``.
        control_dirs: folders of control images (relative to ``root``), searched recursively.
        image_suffixes: file name endings read as images (case-insensitive).
        max_gray_fraction: share of mask pixels that may be neither 0 nor the foreground level.
    """

    root: str = "."
    covid_sets: tuple[str, ...] = ("Train Set", "Test Set")
    images_dir: str = "Images"
    masks_dir: str = "Ground-truths"
    mask_prefix: str = "mask_"
    control_dirs: tuple[str, ...] = ("Control_Group",)
    image_suffixes: tuple[str, ...] = (".png", ".jpg", ".jpeg")
    max_gray_fraction: float = field(default=MAX_GRAY_FRACTION, metadata={"min": 0.0, "finite": True})


def _is_image_name(name: str, suffixes: Iterable[str]) -> bool:
    return name.lower().endswith(tuple(s.lower() for s in suffixes))


def _listing(folder: Path, layout: QataConfig, result: ReadResult, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted); other visible files are reported and left out."""
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    files = []
    for path in entries:
        if path.name.startswith(".") or path.is_dir():
            continue
        if not path.is_file():  # a FIFO, socket, device or broken link: named, never opened
            try:
                check_regular_file(path, "file")
            except InputError as error:
                result.skipped.append(error.as_skipped())
            continue
        if _is_image_name(path.name, layout.image_suffixes):
            files.append(path)
        else:
            expected = ", ".join(layout.image_suffixes)
            result.skip(str(path), "file", f"not an image file by its name (expected {expected})")
    return files


def _mask_for(image: Path, masks: dict[str, Path], layout: QataConfig) -> Path | None:
    for candidate in (layout.mask_prefix + image.name, layout.mask_prefix + image.stem + ".png"):
        if candidate in masks:
            return masks[candidate]
    return None


def _read_covid_set(root: Path, set_dir: str, layout: QataConfig, result: ReadResult) -> list[Sample]:
    images_dir = (root / set_dir / layout.images_dir).resolve()
    masks_dir = (root / set_dir / layout.masks_dir).resolve()
    if not images_dir.is_dir():
        result.skip(str(images_dir), "folder", "images folder not found")
        return []
    masks: dict[str, Path] = {}
    if masks_dir.is_dir():
        for path in _listing(masks_dir, layout, result):
            masks[path.name] = path
    else:
        result.skip(str(masks_dir), "folder", "ground-truth folder not found; its images have no masks")

    samples: list[Sample] = []
    used: set[str] = set()
    for image_path in _listing(images_dir, layout, result):
        mask_path = _mask_for(image_path, masks, layout)
        if mask_path is not None:
            used.add(mask_path.name)
        try:
            image = load_image(image_path)
        except InputError as error:
            result.skipped.append(error.as_skipped())
            continue
        if mask_path is None:
            expected = layout.mask_prefix + image_path.name
            result.skip(str(image_path), "mask", f"COVID-19 image without a mask ({expected} not in {masks_dir})")
            continue
        try:
            mask = read_binary_mask(mask_path, layout.max_gray_fraction)
            check_same_size(str(mask_path), mask, str(image_path), image.pixels.shape)
        except InputError as error:
            result.skipped.append(error.as_skipped())
            continue
        if not mask.any():
            result.warn(str(mask_path), "mask", f"empty infection mask (no infected pixel) for the COVID-19 image "
                        f"{image_path.name}; used as it is")
        samples.append(
            Sample(
                image_id=image_path.name,
                patient_id=image_path.name,
                source=SOURCE,
                path=str(image_path),
                labels={COVID_LABEL: 1.0},
                findings=(COVID_LABEL,),
                bit_depth=image.bit_depth,
                mask_path=str(mask_path),
            )
        )
    for name, mask_path in sorted(masks.items()):
        if name in used:
            continue
        if not name.startswith(layout.mask_prefix):
            reason = f"mask file name does not start with {layout.mask_prefix!r}; no image can be matched"
        else:
            reason = f"mask without an image ({name[len(layout.mask_prefix):]} not in {images_dir})"
        result.skip(str(mask_path), "mask", reason)
    return samples


def _read_controls(root: Path, control_dir: str, layout: QataConfig, result: ReadResult) -> list[Sample]:
    folder = (root / control_dir).resolve()
    if not folder.is_dir():
        result.skip(str(folder), "folder", "control folder not found; no control images read from it")
        return []
    samples = []
    for image_path in _listing(folder, layout, result, recursive=True):
        if layout.mask_prefix and image_path.name.startswith(layout.mask_prefix):
            result.skip(str(image_path), "file", f"named like a mask ({layout.mask_prefix!r} prefix) in a control "
                        "folder; not used as a control X-ray")
            continue
        try:
            image = load_image(image_path)
        except InputError as error:
            result.skipped.append(error.as_skipped())
            continue
        samples.append(
            Sample(
                image_id=image_path.name,
                patient_id=image_path.name,
                source=SOURCE,
                path=str(image_path),
                labels={COVID_LABEL: 0.0},
                findings=(CONTROL_FINDING,),
                bit_depth=image.bit_depth,
            )
        )
    return samples


@register_source(SOURCE, section="qata", config=QataConfig)
def read(data_root: str | os.PathLike, config: QataConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """QaTa-COV19 COVID-19 images with their infection masks, and control images (no mask)."""
    config = coerce_config(QataConfig, config, "qata")
    return read_qata(resolve_root(data_root, config.root), config)


def read_qata(root: str | os.PathLike, config: QataConfig | Mapping[str, Any] | None = None) -> ReadResult:
    """Read the COVID-19 images with their masks and the control images under ``root``.

    Args:
        root: the folder holding the sets itself (``QaTa-COV19-v2`` with the default layout;
            ``config.root`` is not used here).
        config: a `QataConfig`, a mapping of its fields (missing keys take the defaults) or
            None for the defaults.

    Raises:
        SchemaError: ``root`` holds none of the configured images or control folders.
        ConfigError: an unknown key or a bad value.
    """
    layout = coerce_config(QataConfig, config, "qata")
    root = Path(root).resolve()
    present = [root / s / layout.images_dir for s in layout.covid_sets] + [root / c for c in layout.control_dirs]
    if not any(path.is_dir() for path in present):
        raise SchemaError(
            str(root),
            "folder",
            "none of the configured QaTa-COV19 folders exists "
            f"({', '.join(str(p.relative_to(root)) for p in present)}); check root and the qata layout",
        )
    result = ReadResult()
    samples: list[Sample] = []
    for set_dir in layout.covid_sets:
        samples.extend(_read_covid_set(root, set_dir, layout, result))
    for control_dir in layout.control_dirs:
        samples.extend(_read_controls(root, control_dir, layout, result))
    result.samples.extend(check_unique_ids(samples, result))
    return result
