"""A synthetic QaTa-COV19 tree: COVID-19 X-rays with infection masks, controls and bad files.

``generate(out_dir, scale, seed)`` writes the layout `caaxr_tf.data.sources.qata.read_qata` reads with
its default `QataConfig`::

    Train Set/Images/covid_0000.png        Train Set/Ground-truths/mask_covid_0000.png
    Test Set/Images/...                    Test Set/Ground-truths/...   (every 5th COVID image)
    Control_Group/Control_Group_I/control_0000.png, Control_Group/Control_Group_II/...

and ``synthetic_qata.json``, a manifest with one entry per file written and what the reader
should make of it (``expect``: ``"sample"`` or ``"skipped"`` with the reported file and field).

Chest anatomy comes from caaxr_tf/data/synthetic.py. COVID-19 images carry irregular
opacities: each lesion is a smooth random field under an elliptical envelope, thresholded
(so its outline is ragged and it may fall apart into pieces), centred with a preference for
the periphery and the lower zones of a lung, and clipped to the clear lung field; one to four
lesions per image, in one or both lungs. Their masks are the lesions' union (0/255 PNG). The
opacity adds 0.18-0.28 of the display range (with a faint texture and a 1.5-pixel blur at the
edges) over the lungs' ~0.2, so a small U-Net learns it in a few epochs. Controls get the same
anatomy and faint haze, without lesions.

Bad files (``bad`` of each kind per scale): a mask of another size than its image, a mask
without an image, a COVID-19 image without a mask, a mask that is not binary (a soft map),
a truncated COVID-19 image (with a valid mask) and a truncated control image. Also written, and
valid: masks with a few anti-aliased edge pixels (value 200 on <= 0.5 % of the pixels), within
the reader's tolerance.

The output depends only on ``scale`` and ``seed``: every file draws from its own generator
seeded by ``(seed, index)``, so any number of workers writes the same bytes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from caaxr_tf.data.images import encode_png
from caaxr_tf.data.layouts import Layout, register_layout, write_layout
from caaxr_tf.data.synthetic import (
    _Anatomy,
    _compose_frontal,
    _frontal_anatomy,
    _haze,
    _lung_mask,
    _smooth_noise,
    _write_atomic,
)

MANIFEST_NAME = "synthetic_qata.json"
TRAIN_SET = "Train Set"
TEST_SET = "Test Set"
IMAGES_DIR = "Images"
MASKS_DIR = "Ground-truths"
MASK_PREFIX = "mask_"
CONTROL_DIRS = ("Control_Group/Control_Group_I", "Control_Group/Control_Group_II")
TEST_EVERY = 5  # every 5th COVID-19 image goes to the test set (QaTa-COV19-v2 has ~23 %)

BAD_KINDS = ("mask_size", "mask_orphan", "missing_mask", "nonbinary_mask", "corrupt_covid", "corrupt_control")
KINDS = ("covid", "gray_edges", "control") + BAD_KINDS

SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(covid=14, control=12, bad=1, size=(96, 128)),
    # the lead's 5-fold cross-validation: a few hundred images of 224-320 px
    "small": dict(covid=240, control=240, bad=2, size=(224, 320)),
}

MIN_LESION_SHARE = 0.004  # of the image: keeps every COVID-19 mask visibly non-empty
GRAY_EDGE_VALUE = 200
GRAY_EDGE_SHARE = 0.005


@dataclass(frozen=True)
class QataSpec:
    """One file (or image + mask pair) of the plan."""

    index: int
    kind: str
    name: str  # image file name
    image_path: str | None  # relative to the root; None when no image is written
    mask_path: str | None  # relative; None when no mask is written

    @property
    def covid(self) -> bool:
        return self.kind not in ("control", "corrupt_control")


def plan(scale: str = "tiny") -> list[QataSpec]:
    """Every file the scale writes, in a fixed order (the index seeds each one's drawing)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    counts = SCALES[scale]
    kinds = ["covid"] * counts["covid"] + ["control"] * counts["control"]
    kinds += [kind for kind in ("gray_edges",) + BAD_KINDS for _ in range(counts["bad"])]
    specs: list[QataSpec] = []
    numbers = {"covid": 0, "control": 0}
    for index, kind in enumerate(kinds):
        covid = kind not in ("control", "corrupt_control")
        group = "covid" if covid else "control"
        name = f"{group}_{numbers[group]:04d}.png"
        numbers[group] += 1
        if covid:
            subset = TEST_SET if kind == "covid" and numbers["covid"] % TEST_EVERY == 0 else TRAIN_SET
            image_path = f"{subset}/{IMAGES_DIR}/{name}"
            mask_path = f"{subset}/{MASKS_DIR}/{MASK_PREFIX}{name}"
            if kind == "mask_orphan":
                image_path = None
            elif kind == "missing_mask":
                mask_path = None
        else:
            image_path = f"{CONTROL_DIRS[numbers['control'] % len(CONTROL_DIRS)]}/{name}"
            mask_path = None
        specs.append(QataSpec(index, kind, name, image_path, mask_path))
    return specs


# --- drawing -----------------------------------------------------------------------------


def _lesion_blob(rng: np.random.Generator, anatomy: _Anatomy) -> tuple[np.ndarray, int, int]:
    """One irregular opacity: a boolean patch and its top-left corner (x, y) in the image."""
    side = int(rng.integers(2))
    cx, cy, ax, ay = anatomy.lungs[side]
    outward = -1.0 if side == 0 else 1.0  # the image-left lung's periphery is to the left
    x = cx + outward * float(rng.beta(3.0, 1.6)) * 0.7 * ax
    y = cy + (2.0 * float(rng.beta(3.0, 1.8)) - 1.0) * 0.75 * ay
    rx = ax * float(rng.uniform(0.3, 0.6))
    ry = ay * float(rng.uniform(0.18, 0.38))
    x0, y0 = int(np.floor(x - 1.3 * rx)), int(np.floor(y - 1.3 * ry))
    width, height = int(np.ceil(2.6 * rx)) + 1, int(np.ceil(2.6 * ry)) + 1
    xs = (np.arange(width, dtype=np.float32)[None, :] + x0 - x) / rx
    ys = (np.arange(height, dtype=np.float32)[:, None] + y0 - y) / ry
    envelope = 1.0 - xs**2 - ys**2
    field = cv2.GaussianBlur(rng.standard_normal((height, width), dtype=np.float32), (0, 0),
                             max(1.0, 0.22 * min(rx, ry)))
    field /= float(field.std()) + 1e-6
    return envelope + 0.45 * field > 0.2, x0, y0


def _lesions(rng: np.random.Generator, anatomy: _Anatomy, lung_field: np.ndarray) -> np.ndarray:
    """The union of one to four blobs inside the lung field, at least MIN_LESION_SHARE of the image."""
    lesion = np.zeros_like(lung_field)
    target = max(8, int(MIN_LESION_SHARE * lesion.size))
    blobs = int(rng.integers(1, 5))
    drawn = 0
    while drawn < blobs or (np.count_nonzero(lesion) < target and drawn < 50):
        blob, x0, y0 = _lesion_blob(rng, anatomy)
        h, w = lesion.shape
        xa, ya, xb, yb = max(0, x0), max(0, y0), min(w, x0 + blob.shape[1]), min(h, y0 + blob.shape[0])
        if xa < xb and ya < yb:
            lesion[ya:yb, xa:xb] |= blob[ya - y0: yb - y0, xa - x0: xb - x0]
        lesion &= lung_field
        drawn += 1
    return lesion


def render(spec: QataSpec, scale: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Display intensities in [0, 1] and the boolean lesion mask (None for controls)."""
    rng = np.random.default_rng([seed, 7, spec.index])
    low, high = SCALES[scale]["size"]
    height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
    anatomy = _frontal_anatomy(rng, height, width, heart_scale=float(rng.uniform(0.95, 1.1)))
    image, lungs = _compose_frontal(anatomy, rng)
    _haze(image, lungs, rng, 0.03)
    full = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    lesion = None
    if spec.covid:
        lesion = _lesions(rng, anatomy, _lung_mask(anatomy))
        soft = cv2.GaussianBlur(lesion.astype(np.float32), (0, 0), 1.5)
        texture = 0.8 + 0.2 * _smooth_noise(rng, height, width, 12)
        full += float(rng.uniform(0.18, 0.28)) * soft * texture
    full += 0.015 * rng.standard_normal((height, width), dtype=np.float32)
    return np.clip(full, 0.0, 1.0), lesion


def _mask_pixels(spec: QataSpec, lesion: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The stored mask of a spec (uint8) and its number of anti-aliased (gray) pixels."""
    mask = lesion.astype(np.uint8) * 255
    if spec.kind == "mask_size":
        height, width = mask.shape
        return cv2.resize(mask, (width + 16, height), interpolation=cv2.INTER_NEAREST), 0
    if spec.kind == "nonbinary_mask":  # a probability map saved as the mask
        soft = cv2.GaussianBlur(lesion.astype(np.float32), (0, 0), 3.0) * 250.0
        soft += rng.uniform(0.0, 4.0, size=soft.shape)
        return np.clip(np.round(soft), 0, 255).astype(np.uint8), -1
    if spec.kind == "gray_edges":
        inner_edge = lesion & ~cv2.erode(lesion.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        ys, xs = np.nonzero(inner_edge)
        count = min(len(ys), int(GRAY_EDGE_SHARE * mask.size))
        chosen = np.sort(rng.choice(len(ys), size=count, replace=False))
        mask[ys[chosen], xs[chosen]] = GRAY_EDGE_VALUE
        return mask, count
    return mask, 0


def _write_one(task: tuple[str, QataSpec, str, int]) -> dict[str, Any]:
    """Draw and write one spec; return its manifest entry."""
    out_dir, spec, scale, seed = task
    out = Path(out_dir)
    display, lesion = render(spec, scale, seed)
    rng = np.random.default_rng([seed, 8, spec.index])
    height, width = display.shape
    entry: dict[str, Any] = dict(asdict(spec), label="COVID-19" if spec.covid else "control",
                                 height=height, width=width, lesion_pixels=0, gray_pixels=0)
    if spec.image_path is not None:
        data = encode_png(np.round(display * 255.0).astype(np.uint8))
        if spec.kind in ("corrupt_covid", "corrupt_control"):
            data = data[: len(data) // 2]  # truncated: no IEND chunk
        _write_atomic(out / spec.image_path, data)
    if spec.mask_path is not None and lesion is not None:
        mask, gray = _mask_pixels(spec, lesion, rng)
        _write_atomic(out / spec.mask_path, encode_png(mask))
        entry["lesion_pixels"] = int(np.count_nonzero(lesion))
        entry["gray_pixels"] = gray
        entry["mask_height"], entry["mask_width"] = mask.shape
    entry.update(_expectation(spec))
    return entry


def _expectation(spec: QataSpec) -> dict[str, Any]:
    """What read_qata should report for this spec."""
    if spec.kind in ("covid", "gray_edges", "control"):
        return dict(expect="sample", skip_path=None, skip_field=None)
    if spec.kind in ("corrupt_covid", "corrupt_control"):
        return dict(expect="skipped", skip_path=spec.image_path, skip_field="image")
    if spec.kind == "missing_mask":
        return dict(expect="skipped", skip_path=spec.image_path, skip_field="mask")
    return dict(expect="skipped", skip_path=spec.mask_path, skip_field="mask")


def generate(out_dir: str | os.PathLike, scale: str = "tiny", seed: int = 0, workers: int = 1,
             progress: bool = False) -> dict[str, Any]:
    """Write the synthetic QaTa-COV19 tree under ``out_dir`` and return its manifest.

    Args:
        out_dir: the root to pass to ``read_qata`` (created if missing).
        scale: ``tiny`` (tests) or ``small`` (cross-validation runs).
        seed: the same scale and seed always give byte-identical files.
        workers: processes drawing images; the output does not depend on it.
        progress: show a progress bar.

    Returns:
        The manifest also written to ``out_dir/synthetic_qata.json``: ``scale``, ``seed``,
        ``counts`` per kind, ``files`` and one entry per spec in ``images`` (``expect``,
        ``skip_path``, ``skip_field``, sizes, ``lesion_pixels``, ``gray_pixels``).
    """
    return write_layout(QATA, out_dir, scale=scale, seed=seed, workers=workers, progress=progress)


def _finish_layout(out: Path, entries: list[dict[str, Any]], specs: Sequence[QataSpec], scale: str,
                   seed: int) -> dict[str, Any]:
    """The manifest's fields after ``scale`` and ``seed`` (no tables to write)."""
    files = sorted(p for e in entries for p in (e["image_path"], e["mask_path"]) if p is not None)
    counts = {kind: sum(e["kind"] == kind for e in entries) for kind in KINDS}
    return dict(counts=counts, files=files, images=entries)


def describe(manifest: dict[str, Any], out: Path, seconds: float) -> str:
    """The summary ``caaxr-make-synthetic --layout qata`` prints."""
    lines = [f"synthetic QaTa-COV19 ({manifest['scale']}, seed {manifest['seed']}) in {out}"]
    lines += [f"  {kind:<16}{count:>6}" for kind, count in manifest["counts"].items()]
    lines.append(f"written in {seconds:.1f} s")
    return "\n".join(lines)


QATA = register_layout(Layout(
    name="qata", title="synthetic QaTa", unit="img", manifest_name=MANIFEST_NAME, scales=SCALES,
    plan=lambda scale, seed: plan(scale), task=lambda out, spec, scale, seed: (out, spec, scale, seed),
    write=_write_one, finish=_finish_layout, describe=describe, chunksize=8), __name__)


def main(argv: Sequence[str] | None = None) -> int:
    """``caaxr-make-synthetic --layout qata`` (the older ``caaxr-make-synthetic-qata``)."""
    from caaxr_tf.data.synthetic import main as make_synthetic

    return make_synthetic(["--layout", "qata", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
