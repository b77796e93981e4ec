"""QaTa-COV19 reader: COVID-19 chest X-rays with infection masks, and control images.

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
masks. ``root`` is the folder that holds the COVID-19 sets; `QataLayout` names the folders
(defaults: the v2 layout with ``root = QaTa-COV19-v2``; for v1 use ``covid_sets=(".",)``).
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
* a file in an images/masks folder that is not a PNG/JPEG by name: the file, field ``file``;
* a configured folder that does not exist: the folder, field ``folder``.

With v1, the 1,652 COVID-19 images that have no mask by design are reported as "without a
mask" like any other. A root holding none of the configured folders raises ``SchemaError``.
Every image and mask is decoded once (sizes, binariness and truncation are checked).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from caaxr_tf.data.images import load_image
from caaxr_tf.data.masks import MAX_GRAY_FRACTION, check_same_size, read_binary_mask
from caaxr_tf.data.records import InputError, ReadResult, Sample, SchemaError, check_unique_ids

SOURCE = "qata"
COVID_LABEL = "COVID-19"
CONTROL_FINDING = "control"


@dataclass(frozen=True)
class QataLayout:
    """Folder and file names of a QaTa-COV19 tree (all paths relative to the reader's root).

    Attributes:
        covid_sets: folders each holding ``images_dir`` and ``masks_dir`` (``"."`` = the root).
        images_dir: name of the images folder of a set.
        masks_dir: name of the ground-truth folder of a set.
        mask_prefix: a mask is named ``mask_prefix + <image file name>``.
        control_dirs: folders of control images, searched recursively.
        image_suffixes: file name endings read as images (case-insensitive).
        max_gray_fraction: share of mask pixels that may be neither 0 nor the foreground level.
    """

    covid_sets: tuple[str, ...] = ("Train Set", "Test Set")
    images_dir: str = "Images"
    masks_dir: str = "Ground-truths"
    mask_prefix: str = "mask_"
    control_dirs: tuple[str, ...] = ("Control_Group",)
    image_suffixes: tuple[str, ...] = (".png", ".jpg", ".jpeg")
    max_gray_fraction: float = MAX_GRAY_FRACTION

    @classmethod
    def from_config(cls, config: "QataLayout | Mapping[str, Any] | None") -> "QataLayout":
        """A layout from a config mapping (unknown keys raise ``ValueError``)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown qata config key(s) {unknown}; known: {sorted(known)}")
        values = dict(config)
        for key in ("covid_sets", "control_dirs", "image_suffixes"):
            if key in values:
                value = values[key]
                values[key] = (value,) if isinstance(value, str) else tuple(value)
        return cls(**values)


def _is_image_name(name: str, suffixes: Iterable[str]) -> bool:
    return name.lower().endswith(tuple(s.lower() for s in suffixes))


def _listing(folder: Path, layout: QataLayout, result: ReadResult, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted); other visible files are reported and left out."""
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    files = []
    for path in entries:
        if not path.is_file() or path.name.startswith("."):
            continue
        if _is_image_name(path.name, layout.image_suffixes):
            files.append(path)
        else:
            expected = ", ".join(layout.image_suffixes)
            result.skip(str(path), "file", f"not an image file by its name (expected {expected})")
    return files


def _mask_for(image: Path, masks: dict[str, Path], layout: QataLayout) -> Path | None:
    for candidate in (layout.mask_prefix + image.name, layout.mask_prefix + image.stem + ".png"):
        if candidate in masks:
            return masks[candidate]
    return None


def _read_covid_set(root: Path, set_dir: str, layout: QataLayout, result: ReadResult) -> list[Sample]:
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


def _read_controls(root: Path, control_dir: str, layout: QataLayout, result: ReadResult) -> list[Sample]:
    folder = (root / control_dir).resolve()
    if not folder.is_dir():
        result.skip(str(folder), "folder", "control folder not found; no control images read from it")
        return []
    samples = []
    for image_path in _listing(folder, layout, result, recursive=True):
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


def read_qata(root: str | os.PathLike, config: QataLayout | Mapping[str, Any] | None = None) -> ReadResult:
    """Read the COVID-19 images with their masks and the control images under ``root``.

    Args:
        root: the folder holding the sets (``QaTa-COV19-v2`` with the default layout).
        config: a `QataLayout` or a mapping of its fields.

    Raises:
        SchemaError: ``root`` holds none of the configured images or control folders.
    """
    layout = QataLayout.from_config(config)
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
