"""A synthetic CAAXR dataset written in the real on-disk layouts (see docs/data_layouts.md).

``generate(out_dir, scale)`` writes BIMCV-COVID19+ PNGs with DICOM-JSON sidecars, the two CAAXR
annotation CSVs and a CheXpert-small tree with its ``train.csv``/``valid.csv``, plus
``synthetic.json``, a manifest that lets tests compute what the readers should find.

Every class has its own look so that models can learn something: COVID images carry
multifocal peripheral opacities inside their annotated boxes, pneumonia a single dense lobar
consolidation, other unhealthy an enlarged heart and/or a pleural effusion, healthy clear lungs.

The output depends only on ``scale`` and ``seed``: each image draws from its own random
generator seeded by ``(seed, image index)``, so any number of workers gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from caaxr_tf.data.layouts import LAYOUTS, Layout, register_layout, write_layout  # noqa: F401  (LAYOUTS: older name)
from caaxr_tf.data.layouts import write_atomic as _write_atomic
from caaxr_tf.data.sources.chexpert import OBSERVATIONS

MANIFEST_NAME = "synthetic.json"
CHEXPERT_DIR = "CheXpert-v1.0-small"
JPEG_QUALITY = 95
PNG_COMPRESSION = 1

CATEGORIES = (
    "covid_boxes",
    "covid_no_boxes",
    "bimcv_lateral",
    "bimcv_unlisted",
    "chexpert_healthy",
    "chexpert_pneumonia",
    "chexpert_other",
    "chexpert_uncertain",
    "chexpert_lateral",
)

SCALES: dict[str, dict[str, int]] = {
    "tiny": dict(
        covid_boxes=30, covid_no_boxes=10, bimcv_lateral=4, bimcv_unlisted=4,
        chexpert_healthy=20, chexpert_pneumonia=15, chexpert_other=15,
        chexpert_uncertain=5, chexpert_lateral=5,
    ),
    # The paper's pools: 2,388 COVID images (1,656 with boxes); CheXpert classes of at least
    # 2,406 healthy, 2,404 pneumonia and 2,404 other unhealthy images.
    "paper": dict(
        covid_boxes=1656, covid_no_boxes=732, bimcv_lateral=200, bimcv_unlisted=200,
        chexpert_healthy=2500, chexpert_pneumonia=2500, chexpert_other=2500,
        chexpert_uncertain=200, chexpert_lateral=200,
    ),
}
SCALES["small"] = {name: 10 * count for name, count in SCALES["tiny"].items()}
# Real image sizes (issue 16): BIMCV-COVID19+ PNGs at 2,000-3,000 px on the long side, all with
# 12 bits stored in 16, about a third inverted; CheXpert-v1.0-small JPEGs (about 320x390, as in
# every scale). 3x tiny: 144 BIMCV and 180 CheXpert images, generated in a few minutes on 2 cores.
SCALES["realistic"] = {name: 3 * count for name, count in SCALES["tiny"].items()}
# Scales whose BIMCV images have the real sizes and depth; the others keep 430-640 px images
# (and their bytes). A caller registering its own scale may add its name here.
FULL_SIZE_SCALES: set[str] = {"realistic"}
FULL_SIZE_LONG_SIDE = (2000, 3000)
FULL_SIZE_BITS = 12

FINDINGS = (
    "Consolidation",
    "Ground glass opacity",
    "Reticular pattern",
    "Pleural effusion",
    "Nodule",
)
OPACITY_FINDINGS = FINDINGS[:2]
NO_FINDING = "No finding"
# Share of box-annotated COVID images with at least one Consolidation / GGO box.
OPACITY_SHARE = 0.8
INVERSE_SHARE = 0.3

CHEXPERT_LABELS = OBSERVATIONS
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CHEXPERT_LABELS
BOX_COLUMNS = ("image_id", "finding", "x", "y", "width", "height")
STUDY_COLUMNS = ("image_id", "findings")
FIRST_VALID_PATIENT = 64541


@dataclass(frozen=True)
class ImageSpec:
    """Everything decided about one image before it is drawn.

    ``labels`` holds CheXpert CSV cells as written (``"1.0"``, ``"0.0"``, ``"-1.0"`` or ``""``).
    """

    index: int
    source: str
    category: str
    image_id: str
    patient_id: str
    study_id: str
    path: str
    view: str
    modality: str = ""
    bit_depth: int = 8
    invert: bool = False
    opacity: bool = False
    split: str = ""
    sex: str = ""
    age: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    full_size: bool = False  # BIMCV at its real size (FULL_SIZE_SCALES)

    def label(self, name: str) -> str:
        return dict(self.labels).get(name, "")


@dataclass
class Rendered:
    """Displayed intensities in [0, 1] (bright = dense), the clear lung field and the boxes."""

    display: np.ndarray
    lung_mask: np.ndarray
    boxes: list[dict[str, Any]] = field(default_factory=list)


# --- plan --------------------------------------------------------------------------------


def _chunk_sizes(rng: np.random.Generator, total: int, probabilities: Sequence[float]) -> list[int]:
    """Split ``total`` into groups of 1..len(probabilities) items."""
    sizes = []
    while total > 0:
        size = min(total, int(rng.choice(len(probabilities), p=probabilities)) + 1)
        sizes.append(size)
        total -= size
    return sizes


def _exact_flags(rng: np.random.Generator, count: int, share: float) -> list[bool]:
    flags = np.zeros(count, dtype=bool)
    flags[: int(round(share * count))] = True
    return [bool(f) for f in rng.permutation(flags)]


def _bimcv_specs(rng: np.random.Generator, counts: dict[str, int], full_size: bool = False) -> list[dict[str, Any]]:
    frontal = (
        ["covid_boxes"] * counts["covid_boxes"]
        + ["covid_no_boxes"] * counts["covid_no_boxes"]
        + ["bimcv_unlisted"] * counts["bimcv_unlisted"]
    )
    frontal = [frontal[i] for i in rng.permutation(len(frontal))]
    # Storage is assigned per category with exact shares, so every category mixes them.
    storage: dict[str, list[tuple[int, bool]]] = {}
    for category in ("covid_boxes", "covid_no_boxes", "bimcv_unlisted", "bimcv_lateral"):
        n = counts[category]
        bits = [12 if f else 16 for f in _exact_flags(rng, n, 0.5)]
        if full_size:  # drawn all the same, so that the other draws stay those of the small scales
            bits = [FULL_SIZE_BITS] * n
        storage[category] = list(zip(bits, _exact_flags(rng, n, INVERSE_SHARE)))
    opacity = _exact_flags(rng, counts["covid_boxes"], OPACITY_SHARE)

    sessions: list[dict[str, Any]] = []
    position = 0
    for subject, size in enumerate(_chunk_sizes(rng, len(frontal), (0.5, 0.3, 0.2)), start=1):
        for _ in range(size):
            sessions.append(dict(subject=f"S{subject:05d}", session=f"E{len(sessions) + 1:05d}",
                                 category=frontal[position]))
            position += 1
    lateral_at = set(
        int(i) for i in rng.choice(len(sessions), size=counts["bimcv_lateral"], replace=False)
    )

    specs = []
    used = {category: 0 for category in storage}
    for number, session in enumerate(sessions):
        categories = [session["category"]] + (["bimcv_lateral"] if number in lateral_at else [])
        for category in categories:
            bits, invert = storage[category][used[category]]
            flag = category == "covid_boxes" and opacity[used[category]]
            used[category] += 1
            view = "ll" if category == "bimcv_lateral" else ("pa" if rng.random() < 0.65 else "ap")
            specs.append(dict(
                source="bimcv", category=category, subject=session["subject"],
                session=session["session"], view=view,
                modality="dx" if rng.random() < 0.5 else "cr",
                bit_depth=bits, invert=invert, opacity=flag,
            ))
    return specs


def _chexpert_labels(rng: np.random.Generator, category: str) -> dict[str, str]:
    labels = {name: "" for name in CHEXPERT_LABELS}

    def maybe(name: str, p: float, value: str) -> None:
        if rng.random() < p:
            labels[name] = value

    if category == "chexpert_healthy":
        labels["No Finding"] = "1.0"
        maybe("Support Devices", 0.1, "1.0")
        for name in ("Pneumothorax", "Pleural Effusion", "Edema"):
            maybe(name, 0.15, "0.0")
    elif category == "chexpert_pneumonia":
        labels["Pneumonia"] = "1.0"
        maybe("Lung Opacity", 0.6, "1.0")
        maybe("Consolidation", 0.3, "1.0")
        for name in ("Pneumothorax", "Pleural Effusion"):
            maybe(name, 0.3, "0.0")
    elif category == "chexpert_other":
        kind = rng.choice(3, p=(0.4, 0.35, 0.25))
        if kind in (0, 2):
            labels["Cardiomegaly"] = "1.0"
            maybe("Enlarged Cardiomediastinum", 0.3, "1.0")
        if kind in (1, 2):
            labels["Pleural Effusion"] = "1.0"
        maybe("Edema", 0.3, "1.0")
        maybe("Atelectasis", 0.3, "1.0")
        maybe("Support Devices", 0.3, "1.0")
        maybe("Pneumonia", 0.3, "0.0")
        maybe("Pneumothorax", 0.2, "0.0")
    elif category == "chexpert_uncertain":
        deciding = ("Pneumonia", "Cardiomegaly", "Pleural Effusion")[int(rng.choice(3, p=(0.5, 0.25, 0.25)))]
        labels[deciding] = "-1.0"
        maybe("Support Devices", 0.2, "1.0")
        maybe("Pneumothorax", 0.2, "0.0")
    else:
        raise ValueError(f"no CheXpert labels for category {category!r}")
    return labels


def _chexpert_specs(rng: np.random.Generator, counts: dict[str, int]) -> list[dict[str, Any]]:
    frontal = []
    for category in ("chexpert_healthy", "chexpert_pneumonia", "chexpert_other", "chexpert_uncertain"):
        frontal += [category] * counts[category]
    frontal = [frontal[i] for i in rng.permutation(len(frontal))]

    patients: list[list[str]] = []
    position = 0
    for size in _chunk_sizes(rng, len(frontal), (0.6, 0.25, 0.15)):
        patients.append(frontal[position:position + size])
        position += size
    # valid.csv holds a few patients without uncertain labels, as the real one does.
    certain = [i for i, studies in enumerate(patients) if "chexpert_uncertain" not in studies]
    n_valid = min(len(certain), max(1, int(round(0.08 * len(patients)))))
    valid = set(int(i) for i in rng.choice(certain, size=n_valid, replace=False))

    studies = []
    train_number, valid_number = 1, FIRST_VALID_PATIENT
    for i, categories in enumerate(patients):
        split = "valid" if i in valid else "train"
        if split == "valid":
            number, valid_number = valid_number, valid_number + 1
        else:
            number, train_number = train_number, train_number + 1
        sex = "Female" if rng.random() < 0.45 else "Male"
        age = int(rng.integers(18, 91))
        for study, category in enumerate(categories, start=1):
            labels = _chexpert_labels(rng, category)
            if split == "valid":
                labels = {name: value or "0.0" for name, value in labels.items()}
            studies.append(dict(
                source="chexpert", category=category, patient=f"patient{number:05d}",
                study=f"study{study}", split=split, sex=sex, age=age,
                view="ap" if rng.random() < 0.6 else "pa", labels=labels,
            ))
    candidates = [i for i, s in enumerate(studies) if s["category"] != "chexpert_uncertain"]
    lateral_at = set(int(i) for i in rng.choice(candidates, size=counts["chexpert_lateral"], replace=False))

    specs = []
    for i, study in enumerate(studies):
        specs.append(study)
        if i in lateral_at:
            specs.append(dict(study, category="chexpert_lateral", view="lateral"))
    return specs


def plan(scale: str = "tiny", seed: int = 0) -> list[ImageSpec]:
    """Every image of a scale in writing order; cheap (nothing is drawn)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    counts = SCALES[scale]
    full_size = scale in FULL_SIZE_SCALES
    rng = np.random.default_rng([seed, 0])
    raw = _bimcv_specs(rng, counts, full_size) + _chexpert_specs(rng, counts)

    specs = []
    for index, item in enumerate(raw):
        if item["source"] == "bimcv":
            patient = f"sub-{item['subject']}"
            study = f"ses-{item['session']}"
            stem = f"{patient}_{study}_run-1_bp-chest_vp-{item['view']}_{item['modality']}"
            specs.append(ImageSpec(
                index=index, source="bimcv", category=item["category"], image_id=stem,
                patient_id=patient, study_id=study,
                path=f"bimcv/{patient}/{study}/mod-rx/{stem}.png", view=item["view"],
                modality=item["modality"], bit_depth=item["bit_depth"], invert=item["invert"],
                opacity=item["opacity"], full_size=full_size,
            ))
        else:
            name = "view2_lateral.jpg" if item["view"] == "lateral" else "view1_frontal.jpg"
            relative = f"{item['split']}/{item['patient']}/{item['study']}/{name}"
            # The id is the CSV Path without its CheXpert folder and suffix.
            specs.append(ImageSpec(
                index=index, source="chexpert", category=item["category"],
                image_id=relative[: -len(".jpg")],
                patient_id=item["patient"], study_id=f"{item['patient']}/{item['study']}",
                path=f"chexpert/{CHEXPERT_DIR}/{relative}", view=item["view"], split=item["split"],
                sex=item["sex"], age=item["age"], labels=tuple(item["labels"].items()),
            ))
    return specs


# --- drawing -----------------------------------------------------------------------------
# Images are composed at half resolution (blurred masks are cheaper there and need no
# anti-aliasing), scaled up, and given full-resolution noise.

COMPOSE_SCALE = 0.5


@dataclass
class _Anatomy:
    height: int
    width: int
    body: tuple[float, float, float, float]
    lungs: tuple[tuple[float, float, float, float], ...]
    heart: tuple[float, float, float, float]
    mediastinum: tuple[float, float, float, float]
    spine: tuple[float, float]
    lung_level: float
    tissue_level: float


def _frontal_anatomy(rng: np.random.Generator, height: int, width: int, heart_scale: float) -> _Anatomy:
    w, h = float(width), float(height)
    jitter = lambda amount: float(rng.uniform(-amount, amount))  # noqa: E731
    mid = w * (0.5 + jitter(0.015))
    lung_cy = h * (0.45 + jitter(0.02))
    lung_ax = w * (0.135 + jitter(0.01))
    lung_ay = h * (0.28 + jitter(0.015))
    lungs = (
        (mid - w * 0.2 + jitter(0.008) * w, lung_cy, lung_ax, lung_ay),
        (mid + w * 0.2 + jitter(0.008) * w, lung_cy + jitter(0.01) * h, lung_ax, lung_ay * 0.97),
    )
    heart = (mid + w * 0.035 * heart_scale, h * (0.6 + jitter(0.015)),
             w * 0.135 * heart_scale, h * 0.1 * (0.5 + 0.5 * heart_scale))
    return _Anatomy(
        height=height, width=width,
        body=(mid, h * 0.58, w * (0.43 + jitter(0.02)), h * 0.56),
        lungs=lungs, heart=heart,
        mediastinum=(mid - w * 0.055, mid + w * 0.055, h * 0.08, h * 0.7),
        spine=(mid - w * 0.03, mid + w * 0.03),
        lung_level=float(rng.uniform(0.17, 0.23)),
        tissue_level=float(rng.uniform(0.46, 0.54)),
    )


def _ellipse(canvas: np.ndarray, ellipse: Sequence[float], scale: float, value: int = 255) -> None:
    cx, cy, ax, ay = (float(v) * scale for v in ellipse)
    cv2.ellipse(canvas, (int(round(cx)), int(round(cy))),
                (max(1, int(round(ax))), max(1, int(round(ay)))), 0.0, 0.0, 360.0, value, -1)


def _soft(canvas: np.ndarray, sigma: float) -> np.ndarray:
    mask = canvas.astype(np.float32) * (1.0 / 255.0)
    return cv2.GaussianBlur(mask, (0, 0), max(sigma, 0.5))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int = 6) -> np.ndarray:
    """Low-frequency noise in about [0, 1]."""
    grid = rng.random((cells, cells), dtype=np.float32)
    return cv2.resize(grid, (max(1, width), max(1, height)), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)


def _lung_mask(anatomy: _Anatomy) -> np.ndarray:
    """Full-resolution clear lung field: lung ellipses less heart and mediastinum."""
    canvas = np.zeros((anatomy.height, anatomy.width), np.uint8)
    for lung in anatomy.lungs:
        _ellipse(canvas, lung, 1.0)
    _ellipse(canvas, anatomy.heart, 1.0, 0)
    x0, x1, y0, y1 = anatomy.mediastinum
    canvas[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 0
    return canvas > 0


def _compose_frontal(anatomy: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The chest film without disease at COMPOSE_SCALE, and its soft clear-lung mask."""
    s = COMPOSE_SCALE
    gh, gw = int(round(anatomy.height * s)), int(round(anatomy.width * s))
    sigma = 0.012 * gw
    canvas = np.zeros((gh, gw), np.uint8)
    _ellipse(canvas, anatomy.body, s)
    mid = anatomy.body[0] * s
    canvas[: int(0.2 * gh), int(mid - 0.09 * gw): int(mid + 0.09 * gw)] = 255  # neck
    cv2.ellipse(canvas, (int(mid), int(0.22 * gh)), (int(0.46 * gw), int(0.1 * gh)),
                0.0, 180.0, 360.0, 255, -1)
    canvas[int(0.22 * gh):int(0.5 * gh), int(mid - 0.46 * gw):int(mid + 0.46 * gw)] = 255  # shoulders
    body = _soft(canvas, sigma)
    image = 0.03 + (anatomy.tissue_level - 0.03) * body

    canvas[:] = 0
    for lung in anatomy.lungs:
        _ellipse(canvas, lung, s)
    lungs = _soft(canvas, sigma)
    image += (anatomy.lung_level - image) * lungs

    canvas[:] = 0
    for (cx, cy, ax, ay), direction in zip(anatomy.lungs, (-1, 1)):
        top = (cy - ay) * s
        for k in range(9):
            y = int(round(top + k * 2.0 * ay * s / 9.5))
            cv2.ellipse(canvas, (int(mid), y + int(0.5 * ay * s)),
                        (int(abs(cx - anatomy.body[0]) * s + ax * s * 1.1), int(0.5 * ay * s)),
                        0.0, 180.0 if direction < 0 else 270.0, 270.0 if direction < 0 else 360.0,
                        255, max(1, int(0.006 * gw)))
    image += 0.05 * _soft(canvas, 0.6) * lungs

    canvas[:] = 0
    x0, x1, y0, y1 = (v * s for v in anatomy.mediastinum)
    canvas[int(y0):int(y1), int(x0):int(x1)] = 255
    _ellipse(canvas, anatomy.heart, s)
    mediastinum = _soft(canvas, sigma * 1.5)
    image += (0.72 - image) * mediastinum

    canvas[:] = 0
    x0, x1 = (v * s for v in anatomy.spine)
    canvas[:, int(x0):int(x1)] = 255
    image += 0.1 * _soft(canvas, sigma) * body
    image *= 0.94 + 0.12 * _smooth_noise(rng, gh, gw, 4)
    return image, lungs * (1.0 - mediastinum)


def _compose_lateral(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    s = COMPOSE_SCALE
    gh, gw = int(round(height * s)), int(round(width * s))
    sigma = 0.015 * gw
    canvas = np.zeros((gh, gw), np.uint8)
    cv2.ellipse(canvas, (gw // 2, int(0.58 * gh)), (int(0.4 * gw), int(0.52 * gh)), 0.0, 0.0, 360.0, 255, -1)
    body = _soft(canvas, sigma)
    image = 0.03 + float(rng.uniform(0.5, 0.58)) * body
    canvas[:] = 0
    cv2.ellipse(canvas, (int(0.52 * gw), int(0.46 * gh)), (int(0.27 * gw), int(0.3 * gh)),
                -8.0, 0.0, 360.0, 255, -1)
    lungs = _soft(canvas, sigma)
    image += (float(rng.uniform(0.25, 0.3)) - image) * lungs
    canvas[:] = 0
    cv2.ellipse(canvas, (int(0.38 * gw), int(0.64 * gh)), (int(0.15 * gw), int(0.13 * gh)),
                20.0, 0.0, 360.0, 255, -1)
    image += (0.6 - image) * _soft(canvas, sigma * 1.5)
    canvas[:] = 0
    top, bottom = (int(0.74 * gw), 0), (int(0.8 * gw), gh)
    cv2.line(canvas, top, bottom, 255, max(2, int(0.07 * gw)))
    image += 0.25 * _soft(canvas, sigma) * body
    image *= 0.94 + 0.12 * _smooth_noise(rng, gh, gw, 4)
    return image, lungs


def _add_patch(image: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> None:
    """Add ``patch`` at (x0, y0), clipped to the image."""
    h, w = image.shape
    ph, pw = patch.shape
    xa, ya = max(0, x0), max(0, y0)
    xb, yb = min(w, x0 + pw), min(h, y0 + ph)
    if xa < xb and ya < yb:
        image[ya:yb, xa:xb] += patch[ya - y0: yb - y0, xa - x0: xb - x0]


def _lesion(image: np.ndarray, rng: np.random.Generator, box: dict[str, Any], lateral_left: bool) -> None:
    """Draw the opacity of one annotated finding so that it fills most of its box."""
    s = COMPOSE_SCALE
    bx, by, bw, bh = (box[k] * s for k in ("x", "y", "width", "height"))
    short = min(bw, bh)
    finding = box["finding"]
    sharp = {"Consolidation": 0.07, "Nodule": 0.06, "Pleural effusion": 0.06}.get(finding, 0.12)
    sigma = max(0.7, sharp * short)
    margin = int(np.ceil(3 * sigma)) + 1
    ph, pw = int(np.ceil(bh)) + 2 * margin, int(np.ceil(bw)) + 2 * margin
    canvas = np.zeros((ph, pw), np.uint8)
    inset = 0.05 * short
    left, top = margin + inset, margin + inset
    right, bottom = margin + bw - inset, margin + bh - inset
    if finding == "Nodule":
        cv2.ellipse(canvas, (int(round(margin + bw / 2)), int(round(margin + bh / 2))),
                    (max(1, int(bw * 0.47)), max(1, int(bh * 0.47))), 0.0, 0.0, 360.0, 255, -1)
    elif finding == "Pleural effusion":
        # Meniscus: the fluid rises towards the chest wall.
        xs = np.arange(int(left), int(np.ceil(right)) + 1)
        t = (xs - left) / max(1.0, right - left)
        t = 1.0 - t if lateral_left else t
        level = top + (bottom - top) * (0.05 + 0.3 * (1.0 - t) ** 2)
        points = np.concatenate([np.stack([xs, level], 1), [[xs[-1], bottom], [xs[0], bottom]]])
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 255)
    else:
        cv2.rectangle(canvas, (int(round(left)), int(round(top))),
                      (int(round(right)), int(round(bottom))), 255, -1)
    mask = _soft(canvas, sigma)
    texture = _smooth_noise(rng, ph, pw, 5)
    if finding == "Ground glass opacity":
        patch = mask * (0.12 + 0.08 * texture)
    elif finding == "Reticular pattern":
        net = np.zeros((ph, pw), np.uint8)
        for _ in range(10):
            p = rng.uniform((left, top), (right, bottom), size=(2, 2)).round().astype(int)
            cv2.line(net, tuple(int(v) for v in p[0]), tuple(int(v) for v in p[1]), 255, 1)
        patch = mask * (0.1 + 0.18 * _soft(net, 0.6) + 0.04 * texture)
    else:  # consolidation, nodule, effusion: dense
        patch = mask * (0.3 + 0.08 * texture)
    _add_patch(image, patch.astype(np.float32), int(round(bx)) - margin, int(round(by)) - margin)


def _inside_ellipse(xs: np.ndarray, ys: np.ndarray, ellipse: Sequence[float],
                    scale: float = 1.0) -> np.ndarray:
    cx, cy, ax, ay = ellipse
    return ((xs - cx) / (ax * scale)) ** 2 + ((ys - cy) / (ay * scale)) ** 2 <= 1.0


def _place_box(rng: np.random.Generator, anatomy: _Anatomy, side: int, finding: str,
               taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """A box (x, y, w, h) in the outer (peripheral) part of a lung, clear of heart and other boxes."""
    cx, cy, ax, ay = anatomy.lungs[side]
    width, height = anatomy.width, anatomy.height
    for attempt in range(60):
        shrink = 0.85 ** (attempt // 12)
        if finding == "Nodule":
            bw = bh = rng.uniform(0.25, 0.4) * ax * shrink
        else:
            bw = rng.uniform(0.55, 0.95) * ax * shrink
            bh = rng.uniform(0.25, 0.5) * ay * shrink
        x_lo, x_hi = (cx - ax, cx + 0.1 * ax - bw) if side == 0 else (cx - 0.1 * ax, cx + ax - bw)
        y_lo = cy + 0.15 * ay if finding == "Pleural effusion" else cy - ay
        y_hi = cy + ay - bh
        if x_hi <= x_lo or y_hi <= y_lo:
            continue
        x, y = int(rng.uniform(x_lo, x_hi)), int(rng.uniform(y_lo, y_hi))
        w, h = int(round(bw)), int(round(bh))
        if w < 6 or h < 6 or x < 0 or y < 0 or x + w > width or y + h > height:
            continue
        corners = np.array([(x, y), (x + w, y), (x, y + h), (x + w, y + h)], np.float64)
        if not _inside_ellipse(corners[:, 0], corners[:, 1], anatomy.lungs[side], 0.95).all():
            continue
        # Both shapes are convex: they meet only if the box outline enters the heart or the
        # heart's centre lies in the box.
        t = np.linspace(0.0, 1.0, 24)
        outline_x = np.concatenate([x + w * t, x + w * t, np.full_like(t, x), np.full_like(t, x + w)])
        outline_y = np.concatenate([np.full_like(t, y), np.full_like(t, y + h), y + h * t, y + h * t])
        hx, hy = anatomy.heart[:2]
        if _inside_ellipse(outline_x, outline_y, anatomy.heart, 1.08).any():
            continue
        if x <= hx <= x + w and y <= hy <= y + h:
            continue
        gap = 4
        if any(x < tx + tw + gap and tx < x + w + gap and y < ty + th + gap and ty < y + h + gap
               for tx, ty, tw, th in taken):
            continue
        return x, y, w, h
    return None


def _covid_boxes(rng: np.random.Generator, anatomy: _Anatomy, opacity: bool) -> list[dict[str, Any]]:
    count = int(rng.choice(3, p=(0.4, 0.35, 0.25))) + 1
    first_side = int(rng.integers(2))
    boxes: list[dict[str, Any]] = []
    taken: list[tuple[int, int, int, int]] = []
    for k in range(count):
        if not opacity:
            finding = FINDINGS[2 + int(rng.integers(3))]
        elif k == 0:
            finding = OPACITY_FINDINGS[int(rng.integers(2))]
        else:
            finding = FINDINGS[int(rng.choice(5, p=(0.3, 0.35, 0.15, 0.1, 0.1)))]
        side = (first_side + k) % 2
        placed = _place_box(rng, anatomy, side, finding, taken)
        if placed is None and not boxes:
            # Always clear of the heart: upper outer part of the lung.
            cx, cy, ax, ay = anatomy.lungs[side]
            w, h = int(0.3 * ax), int(0.3 * ay)
            centre = cx - 0.45 * ax if side == 0 else cx + 0.45 * ax
            placed = (int(centre - w / 2), int(cy - 0.3 * ay - h / 2), w, h)
        if placed is None:
            continue
        taken.append(placed)
        x, y, w, h = placed
        boxes.append(dict(finding=finding, x=x, y=y, width=w, height=h, side=side))
    return boxes


def _haze(image: np.ndarray, lungs: np.ndarray, rng: np.random.Generator, amount: float) -> None:
    """Faint diffuse bilateral haze, heavier in the lower and outer lung."""
    gh, gw = image.shape
    ys = np.linspace(0.0, 1.0, gh, dtype=np.float32)[:, None]
    xs = np.abs(np.linspace(-1.0, 1.0, gw, dtype=np.float32))[None, :]
    weight = 0.5 + 0.5 * ys + 0.4 * xs
    image += amount * weight * _smooth_noise(rng, gh, gw, 8) * lungs


def _lobar_consolidation(image: np.ndarray, anatomy: _Anatomy, clear: np.ndarray,
                         rng: np.random.Generator, amount: float = 0.38, extent: float = 1.0) -> None:
    """One large dense opacity filling a lobe-sized part of one lung."""
    s = COMPOSE_SCALE
    gh, gw = image.shape
    cx, cy, ax, ay = anatomy.lungs[int(rng.integers(2))]
    centre = float((-0.55, 0.05, 0.55)[int(rng.choice(3, p=(0.25, 0.2, 0.55)))])  # upper, middle, lower
    lung = np.zeros((gh, gw), np.uint8)
    _ellipse(lung, (cx, cy, ax, ay), s)
    lobe = np.zeros_like(lung)
    _ellipse(lobe, (cx + rng.uniform(-0.2, 0.2) * ax, cy + centre * ay, 1.1 * ax * extent,
                    rng.uniform(0.4, 0.55) * ay * extent), s)
    mask = _soft(lung & lobe, 0.025 * gw) * clear
    image += amount * mask * (0.7 + 0.3 * _smooth_noise(rng, gh, gw, 10))


def _effusion(image: np.ndarray, anatomy: _Anatomy, side: int, depth: float) -> None:
    """Fluid in the costophrenic angle: a bright base with a meniscus rising laterally."""
    s = COMPOSE_SCALE
    gh, gw = image.shape
    cx, cy, ax, ay = anatomy.lungs[side]
    xs = np.arange(gw, dtype=np.float32)[None, :] / s
    lateral = np.clip((cx - xs) / ax if side == 0 else (xs - cx) / ax, -1.0, 1.5)
    level = cy + ay * (1.0 - depth) - ay * 0.35 * depth * np.clip(lateral, 0.0, None) ** 2
    ys = np.arange(gh, dtype=np.float32)[:, None] / s
    canvas = np.zeros((gh, gw), np.uint8)
    _ellipse(canvas, (cx, cy, ax * 1.05, ay * 1.05), s)
    fluid = ((ys > level) & (canvas > 0)).astype(np.uint8) * 255
    mask = _soft(fluid, 0.012 * gw)
    image += (0.62 - image) * mask


def _edema(image: np.ndarray, anatomy: _Anatomy, lungs: np.ndarray, rng: np.random.Generator) -> None:
    """Perihilar (butterfly) haze."""
    s = COMPOSE_SCALE
    gh, gw = image.shape
    ys = (np.arange(gh, dtype=np.float32)[:, None] / s - anatomy.lungs[0][1]) / anatomy.lungs[0][3]
    xs = (np.arange(gw, dtype=np.float32)[None, :] / s - anatomy.body[0]) / (anatomy.width * 0.3)
    weight = np.exp(-(xs ** 2) * 3.0 - (ys ** 2) * 2.0)
    image += 0.14 * weight * lungs * (0.7 + 0.3 * _smooth_noise(rng, gh, gw, 8))


def _frontal_size(rng: np.random.Generator, source: str) -> tuple[int, int]:
    if source == "bimcv":
        height = int(rng.integers(440, 641))
        width = int(rng.integers(400, 601))
        if width == height:
            width -= 7
    else:
        width = int(rng.integers(290, 331))
        height = int(rng.integers(340, 391))
    return height, width


def _full_frontal_size(rng: np.random.Generator) -> tuple[int, int]:
    """A BIMCV film at its real size: portrait, long side in FULL_SIZE_LONG_SIDE."""
    low, high = FULL_SIZE_LONG_SIDE
    height = int(rng.integers(low, high + 1))
    width = int(round(height * rng.uniform(0.78, 0.97)))
    return height, width


def _finish(image: np.ndarray, rng: np.random.Generator, height: int, width: int, noise: float) -> np.ndarray:
    full = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    full += noise * rng.standard_normal((height, width), dtype=np.float32)
    return np.clip(full, 0.0, 1.0)


def render(spec: ImageSpec, seed: int = 0) -> Rendered:
    """Draw one image of the plan; the result depends only on ``spec`` and ``seed``."""
    rng = np.random.default_rng([seed, 1, spec.index])
    height, width = _frontal_size(rng, spec.source)
    if spec.full_size and spec.source == "bimcv":
        height, width = _full_frontal_size(np.random.default_rng([seed, 3, spec.index]))
    lateral = spec.view in ("ll", "lateral")
    noise = 0.012 if spec.source == "bimcv" else 0.022
    if lateral:
        image, _ = _compose_lateral(rng, height, width)
        if spec.source == "bimcv":
            _haze(image, np.ones_like(image), rng, 0.03)
        display = _finish(image, rng, height, width, noise)
        return Rendered(display, np.zeros((height, width), bool))

    heart_scale = 1.1 if spec.view == "ap" else 1.0
    if spec.label("Cardiomegaly") == "1.0":
        heart_scale = float(rng.uniform(1.4, 1.6))
    elif spec.label("Cardiomegaly") == "-1.0":
        heart_scale = 1.25
    anatomy = _frontal_anatomy(rng, height, width, heart_scale)
    image, lungs = _compose_frontal(anatomy, rng)
    boxes: list[dict[str, Any]] = []
    if spec.category == "covid_boxes":
        boxes = _covid_boxes(rng, anatomy, spec.opacity)
        _haze(image, lungs, rng, 0.04)
        for box in boxes:
            _lesion(image, rng, box, lateral_left=box["side"] == 0)
    elif spec.source == "bimcv":
        _haze(image, lungs, rng, 0.12)
    elif spec.label("Pneumonia") == "1.0":
        _lobar_consolidation(image, anatomy, lungs, rng)
    elif spec.label("Pneumonia") == "-1.0":
        _lobar_consolidation(image, anatomy, lungs, rng, amount=0.14, extent=0.5)
    if spec.source == "chexpert":
        effusion = spec.label("Pleural Effusion")
        if effusion in ("1.0", "-1.0"):
            sides = (0, 1) if effusion == "1.0" and rng.random() < 0.3 else (int(rng.integers(2)),)
            for side in sides:
                depth = rng.uniform(0.35, 0.6) if effusion == "1.0" else 0.18
                _effusion(image, anatomy, side, float(depth))
        if spec.label("Edema") == "1.0":
            _edema(image, anatomy, lungs, rng)
    display = _finish(image, rng, height, width, noise)
    for box in boxes:
        box.pop("side")
    return Rendered(display, _lung_mask(anatomy), boxes)


# --- encoding and writing ----------------------------------------------------------------


def _encode_bimcv(spec: ImageSpec, rendered: Rendered, rng: np.random.Generator) -> bytes:
    top = 2 ** spec.bit_depth - 1
    # Each acquisition uses its own window of the stored range.
    low = rng.uniform(0.01, 0.08) * top
    high = rng.uniform(0.86, 0.99) * top
    stored = np.round(low + rendered.display * (high - low)).astype(np.uint16)
    if spec.invert:
        stored = (top - stored).astype(np.uint16)
    ok, encoded = cv2.imencode(".png", stored, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError(f"PNG encoding failed for {spec.path}")
    return encoded.tobytes()


def _sidecar(spec: ImageSpec, height: int, width: int) -> bytes:
    tags = {
        "00080060": {"vr": "CS", "Value": [spec.modality.upper()]},
        "00100020": {"vr": "LO", "Value": [spec.patient_id]},
        "00185101": {"vr": "CS", "Value": [spec.view.upper()]},
        "00280004": {"vr": "CS", "Value": ["MONOCHROME2"]},
        "00280010": {"vr": "US", "Value": [height]},
        "00280011": {"vr": "US", "Value": [width]},
        "00280100": {"vr": "US", "Value": [16]},
        "00280101": {"vr": "US", "Value": [spec.bit_depth]},
        "00280102": {"vr": "US", "Value": [spec.bit_depth - 1]},
        "20500020": {"vr": "CS", "Value": ["INVERSE" if spec.invert else "IDENTITY"]},
    }
    return (json.dumps(tags, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _encode_chexpert(spec: ImageSpec, rendered: Rendered, rng: np.random.Generator) -> bytes:
    gamma = rng.uniform(0.75, 0.95)
    pixels = np.round(255.0 * rendered.display ** gamma).astype(np.uint8)
    height, width = pixels.shape
    # The side marker burnt into most films.
    corner = (int((0.06 if rng.random() < 0.5 else 0.86) * width), int(0.09 * height))
    cv2.putText(pixels, "L" if spec.view != "lateral" else "R", corner, cv2.FONT_HERSHEY_SIMPLEX,
                0.6, 250, 2)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"JPEG encoding failed for {spec.path}")
    return encoded.tobytes()


def _write_one(task: tuple[str, ImageSpec, int]) -> dict[str, Any]:
    """Draw, encode and write one image (and its sidecar); return its manifest entry."""
    out_dir, spec, seed = task
    rendered = render(spec, seed)
    height, width = rendered.display.shape
    encode_rng = np.random.default_rng([seed, 2, spec.index])
    target = Path(out_dir) / spec.path
    if spec.source == "bimcv":
        _write_atomic(target, _encode_bimcv(spec, rendered, encode_rng))
        _write_atomic(target.with_suffix(".json"), _sidecar(spec, height, width))
    else:
        _write_atomic(target, _encode_chexpert(spec, rendered, encode_rng))
    entry: dict[str, Any] = dict(
        index=spec.index, source=spec.source, category=spec.category, image_id=spec.image_id,
        patient_id=spec.patient_id, study_id=spec.study_id, path=spec.path, view=spec.view,
        height=height, width=width, invert=spec.invert, bit_depth=spec.bit_depth,
        boxes=rendered.boxes,
    )
    if spec.source == "bimcv":
        entry["modality"] = spec.modality
        entry["findings"] = _findings(spec, rendered.boxes)
    else:
        entry["split"] = spec.split
        entry["labels"] = {k: (float(v) if v else None) for k, v in spec.labels}
    return entry


def _findings(spec: ImageSpec, boxes: list[dict[str, Any]]) -> list[str]:
    """Study-level findings written for an image: its box findings, or ``No finding``."""
    if spec.category == "covid_boxes":
        present = {box["finding"] for box in boxes}
        return [name for name in FINDINGS if name in present]
    if spec.category == "covid_no_boxes":
        return [NO_FINDING]
    return []


def _csv_bytes(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _write_tables(out: Path, entries: list[dict[str, Any]], specs: list[ImageSpec]) -> list[str]:
    box_rows, study_rows = [], []
    for entry in entries:
        if entry["category"] not in ("covid_boxes", "covid_no_boxes"):
            continue
        study_rows.append((entry["image_id"], ";".join(entry["findings"])))
        for box in entry["boxes"]:
            box_rows.append((entry["image_id"], box["finding"],
                             box["x"], box["y"], box["width"], box["height"]))
    tables = {
        "caaxr/BoundingBox.csv": _csv_bytes(BOX_COLUMNS, box_rows),
        "caaxr/Study-Level_Annotations.csv": _csv_bytes(STUDY_COLUMNS, study_rows),
    }
    for split in ("train", "valid"):
        rows = []
        chosen = [s for s in specs if s.source == "chexpert" and s.split == split]
        for spec in sorted(chosen, key=lambda s: s.image_id):
            frontal = spec.view != "lateral"
            rows.append([spec.path[len("chexpert/"):], spec.sex, spec.age, "Frontal" if frontal else "Lateral",
                         spec.view.upper() if frontal else ""] + [v for _, v in spec.labels])
        tables[f"chexpert/{CHEXPERT_DIR}/{split}.csv"] = _csv_bytes(CHEXPERT_COLUMNS, rows)
    for relative, data in tables.items():
        _write_atomic(out / relative, data)
    return sorted(tables)


def generate(out_dir: str | os.PathLike, scale: str = "tiny", seed: int = 0, workers: int = 1,
             progress: bool = False) -> dict[str, Any]:
    """Write the synthetic dataset under ``out_dir`` and return its manifest.

    Args:
        out_dir: the data root (``bimcv/``, ``caaxr/`` and ``chexpert/`` are created in it).
        scale: ``tiny``, ``small`` (10x tiny), ``realistic`` (3x tiny, BIMCV at real sizes:
            2,000-3,000 px, 12 bits stored) or ``paper`` (covers the paper's class counts).
        seed: the same scale and seed always give byte-identical files.
        workers: processes drawing images; the output does not depend on it.
        progress: show a progress bar.

    Returns:
        The manifest also written to ``out_dir/synthetic.json``: ``scale``, ``seed``,
        ``counts`` per category, ``files`` and one entry per image in ``images``.
    """
    return write_layout(CAAXR, out_dir, scale=scale, seed=seed, workers=workers, progress=progress)


def _finish_layout(out: Path, entries: list[dict[str, Any]], specs: Sequence[ImageSpec], scale: str,
                   seed: int) -> dict[str, Any]:
    """Write the CSV tables; the manifest's fields after ``scale`` and ``seed``."""
    tables = _write_tables(out, entries, list(specs))
    files = tables + [e["path"] for e in entries]
    files += [e["path"][: -len(".png")] + ".json" for e in entries if e["source"] == "bimcv"]
    counts = {category: 0 for category in CATEGORIES}
    for entry in entries:
        counts[entry["category"]] += 1
    return dict(
        counts=counts,
        boxes=sum(len(e["boxes"]) for e in entries),
        bimcv_subjects=len({e["patient_id"] for e in entries if e["source"] == "bimcv"}),
        chexpert_patients=len({e["patient_id"] for e in entries if e["source"] == "chexpert"}),
        files=sorted(files), images=entries,
    )


def describe(manifest: dict[str, Any], out: Path, seconds: float) -> str:
    """The summary ``caaxr-make-synthetic`` prints for the caaxr layout."""
    lines = [f"synthetic dataset ({manifest['scale']}, seed {manifest['seed']}) in {out}", ""]
    lines.append(f"{'category':<22}{'images':>8}")
    lines.append("-" * 30)
    for category, count in manifest["counts"].items():
        lines.append(f"{category:<22}{count:>8}")
    lines.append("-" * 30)
    lines.append(f"{'total':<22}{sum(manifest['counts'].values()):>8}")
    lines.append(f"{'boxes':<22}{manifest['boxes']:>8}")
    lines.append(f"{'BIMCV subjects':<22}{manifest['bimcv_subjects']:>8}")
    lines.append(f"{'CheXpert patients':<22}{manifest['chexpert_patients']:>8}")
    lines.append(f"written in {seconds:.1f} s")
    return "\n".join(lines)


CAAXR = register_layout(Layout(
    name="caaxr", title="synthetic", unit="img", manifest_name=MANIFEST_NAME, scales=SCALES, plan=plan,
    task=lambda out, spec, scale, seed: (out, spec, seed), write=_write_one, finish=_finish_layout,
    describe=describe, chunksize=8), __name__)


def main(argv: Sequence[str] | None = None) -> int:
    """``caaxr-make-synthetic``: write a synthetic set in one of the real layouts
    (``caaxr_tf.data.layouts.main``)."""
    from caaxr_tf.data.layouts import main as make_synthetic

    return make_synthetic(argv)


if __name__ == "__main__":
    sys.exit(main())
