"""A synthetic COVID-CTset: 16-bit CT slice sequences in the real layout (docs/ct.md).

``generate(out_dir, scale, seed)`` writes ``<group>/<patient>/SR_<n>/IM<00001>.tif`` slices,
the labelled-slice CSV ``all.csv`` (``filename,class`` in the training part's naming) and
``synthetic_ct.json``, a manifest from which tests compute what readers and slice selection
should find.

Each slice is drawn in Hounsfield units and stored as raw = HU + 1024 (uint16, 512x512, LZW
TIFF): air ~24, lung ~150..250, fat ~924, soft tissue ~1064, bone ~1500..2000. Along a
sequence the lungs open and close (a smooth bump in their size), so the first and last slices
have little dark lung in the selection region. COVID patients carry ground-glass lesions
(-700..-300 HU) as 3-D blobs, most of them tiny, a few large, spanning a few slices; the CSV
labels a COVID patient's slices with a visible lesion ``covid`` and a normal patient's slices
with an open lung ``normal``, as the real CSV does.

A few bad files are added after the last slice of some series: an 8-bit slice, a file with a
``.tif`` name that is not a TIFF, a 16-bit slice of another size, and a series of one slice.

The output depends only on ``scale`` and ``seed``: a series draws from generators seeded by
``(seed, patient)`` and ``(seed, patient, series)``, so any number of workers gives the same
bytes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from caaxr_tf.ct.selection import DARK_BELOW, REGION_COLS, REGION_ROWS, SLICE_SHAPE
from caaxr_tf.data.ct_series import HU_OFFSET, hu_to_raw
from caaxr_tf.data.layouts import Layout, register_layout, write_layout
from caaxr_tf.data.synthetic import _csv_bytes, _write_atomic

MANIFEST_NAME = "synthetic_ct.json"
LABELS_CSV = "all.csv"
TIFF_PARAMETERS = [cv2.IMWRITE_TIFF_COMPRESSION, cv2.IMWRITE_TIFF_COMPRESSION_LZW,
                   cv2.IMWRITE_TIFF_PREDICTOR, cv2.IMWRITE_TIFF_PREDICTOR_HORIZONTAL]
SERIES_NAMES = ("SR_2", "SR_3", "SR_4")
# A lesion is visible in a slice (and the slice labelled covid) from this many pixels on.
VISIBLE_LESION_PIXELS = 12
# A normal person's slice is listed in the CSV when the lung is at least this open.
LABELLED_OPENING = 0.5
BAD_KINDS = ("eight_bit", "not_tiff", "other_size", "one_slice")

SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(covid=2, normal=2, slices=(16, 24), second_series=0.5, group_size=5),
    "small": dict(covid=10, normal=10, slices=(30, 60), second_series=0.3, group_size=5),
}

HU_AIR, HU_FAT, HU_SOFT, HU_BONE = -1000.0, -100.0, 40.0, 700.0
RIB_ANGLES = (-165, -135, -105, -75, -45, -15, 15, 165)  # degrees, 0 = patient's left, -90 = front


@dataclass(frozen=True)
class SeriesSpec:
    """Everything decided about one series before it is drawn."""

    index: int
    patient_index: int
    group: str
    patient_id: str
    covid: bool
    series: str
    num_slices: int
    bad: str = ""  # one of BAD_KINDS added to this series, or ""

    @property
    def folder(self) -> str:
        return f"{self.group}/{self.patient_id}/{self.series}"


def slice_name(number: int) -> str:
    """``IM00001.tif`` for slice number 1 (numbers start at 1, as in COVID-CTset)."""
    return f"IM{number:05d}.tif"


def plan(scale: str = "tiny", seed: int = 0) -> list[SeriesSpec]:
    """Every series of a scale in writing order; cheap (nothing is drawn)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    counts = SCALES[scale]
    rng = np.random.default_rng([seed, 0])
    low, high = counts["slices"]
    patients = [True] * counts["covid"] + [False] * counts["normal"]
    specs: list[SeriesSpec] = []
    group_number = {True: 0, False: 0}
    in_group = {True: counts["group_size"], False: counts["group_size"]}
    bad_patients = {int(p): kind for p, kind in zip(rng.permutation(len(patients)), BAD_KINDS)}
    for patient_index, covid in enumerate(patients):
        if in_group[covid] == counts["group_size"]:
            group_number[covid] += 1
            in_group[covid] = 0
        in_group[covid] += 1
        group = f"{'covid' if covid else 'normal'}{group_number[covid]}"
        patient_id = f"patient{patient_index + 1}"
        names = ["SR_2"] + (["SR_3"] if rng.random() < counts["second_series"] else [])
        bad = bad_patients.get(patient_index, "")
        for number, name in enumerate(names):
            specs.append(SeriesSpec(
                index=len(specs), patient_index=patient_index, group=group, patient_id=patient_id,
                covid=covid, series=name, num_slices=int(rng.integers(low, high + 1)),
                bad=bad if number == 0 and bad != "one_slice" else "",
            ))
        if bad == "one_slice":
            specs.append(SeriesSpec(
                index=len(specs), patient_index=patient_index, group=group, patient_id=patient_id,
                covid=covid, series="SR_4", num_slices=1, bad="one_slice",
            ))
    return specs


# --- anatomy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """A ground-glass blob: centre (x, y) in pixels, z in 0..1 of the sequence, radii, HU."""

    x: float
    y: float
    z: float
    radius: float
    z_radius: float
    hu: float
    side: int


@dataclass
class Anatomy:
    """One person's body, shared by all their series (z runs 0..1 from apex to base)."""

    body: tuple[float, float, float, float]  # cx, cy, semi-axis x, semi-axis y
    lung_centres: tuple[tuple[float, float], tuple[float, float]]
    lung_axes: tuple[float, float]
    lung_range: tuple[float, float]  # z where the lungs start and end
    lung_hu: float
    heart: tuple[float, float, float, float]
    lesions: list[Lesion] = field(default_factory=list)

    def opening(self, z: float) -> float:
        """0 outside the lungs' z range, rising to 1 in the middle: the lung 'opens and closes'."""
        start, end = self.lung_range
        if not start < z < end:
            return 0.0
        t = (z - start) / (end - start)
        return float(np.sin(np.pi * t) ** 0.6)


def _anatomy(rng: np.random.Generator, covid: bool) -> Anatomy:
    cx, cy = 256 + rng.uniform(-8, 8), 262 + rng.uniform(-8, 8)
    body = (cx, cy, rng.uniform(205, 228), rng.uniform(150, 168))
    spread = rng.uniform(88, 100)
    lung_y = cy - rng.uniform(8, 16)
    lungs = ((cx - spread, lung_y), (cx + spread, lung_y + rng.uniform(-4, 4)))
    axes = (rng.uniform(70, 80), rng.uniform(112, 124))
    start, end = rng.uniform(0.04, 0.12), rng.uniform(0.88, 0.96)
    heart = (cx + rng.uniform(8, 18), cy + rng.uniform(20, 35), rng.uniform(48, 58), rng.uniform(52, 62))
    anatomy = Anatomy(body=body, lung_centres=lungs, lung_axes=axes, lung_range=(start, end),
                      lung_hu=rng.uniform(-880, -800), heart=heart)
    if covid:
        anatomy.lesions = _lesions(rng, anatomy)
    return anatomy


def _lesions(rng: np.random.Generator, anatomy: Anatomy) -> list[Lesion]:
    """Several ground-glass blobs, most tiny, some medium, few large, mostly peripheral."""
    start, end = anatomy.lung_range
    lesions = []
    for _ in range(int(rng.integers(8, 15))):
        kind = rng.choice(3, p=(0.6, 0.3, 0.1))
        radius = (rng.uniform(2.5, 5), rng.uniform(7, 15), rng.uniform(20, 34))[kind]
        z_radius = (rng.uniform(0.03, 0.06), rng.uniform(0.06, 0.12), rng.uniform(0.12, 0.2))[kind]
        side = int(rng.integers(0, 2))
        (lx, ly), (ax, ay) = anatomy.lung_centres[side], anatomy.lung_axes
        angle = rng.uniform(0, 2 * np.pi)
        reach = rng.uniform(0.45, 0.8)  # peripheral: out towards the lung wall
        lesions.append(Lesion(
            x=float(lx + reach * ax * np.cos(angle)), y=float(ly + reach * ay * np.sin(angle)),
            z=float(rng.uniform(start + 0.2 * (end - start), end - 0.15 * (end - start))),
            radius=float(radius), z_radius=float(z_radius), hu=float(rng.uniform(-700, -300)), side=side,
        ))
    return lesions


def _fill_ellipse(canvas: np.ndarray, cx: float, cy: float, ax: float, ay: float, value: float = 1.0) -> None:
    if ax >= 0.5 and ay >= 0.5:
        cv2.ellipse(canvas, (int(round(cx)), int(round(cy))), (int(round(ax)), int(round(ay))),
                    0.0, 0.0, 360.0, value, -1)


@dataclass
class RenderedSlice:
    hu: np.ndarray
    opening: float
    lesion_pixels: int


def render_slice(anatomy: Anatomy, z: float, rng: np.random.Generator, noise_hu: float) -> RenderedSlice:
    """One axial slice at height ``z`` in HU (float32, 512x512)."""
    height, width = SLICE_SHAPE
    hu = np.full((height, width), HU_AIR, np.float32)
    cx, cy, bx, by = anatomy.body
    canvas = np.zeros((height, width), np.float32)
    _fill_ellipse(canvas, cx, cy, bx, by)
    hu[canvas > 0] = HU_FAT
    canvas[:] = 0
    _fill_ellipse(canvas, cx, cy, bx - 14, by - 12)
    hu[canvas > 0] = HU_SOFT

    opening = anatomy.opening(z)
    lung = np.zeros((height, width), np.float32)
    if opening > 0:
        ax, ay = anatomy.lung_axes
        for lx, ly in anatomy.lung_centres:
            _fill_ellipse(lung, lx, ly + 25 * (1 - opening), ax * opening, ay * opening)
        hx, hy, hax, hay = anatomy.heart
        heart_size = 0.6 + 0.4 * opening
        _fill_ellipse(lung, hx, hy, hax * heart_size, hay * heart_size, 0.0)
        lung_mask = lung > 0
        hu[lung_mask] = anatomy.lung_hu
        # Vessels: small soft-tissue dots inside the lung.
        ys, xs = np.nonzero(lung_mask)
        if ys.size:
            picks = rng.integers(0, ys.size, size=int(40 * opening) + 4)
            vessels = np.zeros_like(lung)
            for i in picks:
                cv2.circle(vessels, (int(xs[i]), int(ys[i])), int(rng.integers(1, 4)), 1.0, -1)
            hu[(vessels > 0) & lung_mask] = HU_SOFT
    lesion_pixels = 0
    if anatomy.lesions and opening > 0:
        lesion_pixels = _draw_lesions(hu, lung > 0, anatomy.lesions, z, rng)

    # Spine (vertebral body with a denser rim) and a few ribs along the body wall.
    spine_y = cy + by - 48
    canvas[:] = 0
    _fill_ellipse(canvas, cx, spine_y, 24, 22)
    hu[canvas > 0] = HU_BONE + 500
    canvas[:] = 0
    _fill_ellipse(canvas, cx, spine_y, 19, 17)
    hu[canvas > 0] = HU_BONE - 350
    if opening > 0:
        for angle in np.deg2rad(RIB_ANGLES):
            canvas[:] = 0
            _fill_ellipse(canvas, cx + (bx - 22) * np.cos(angle), cy + (by - 20) * np.sin(angle), 7, 5)
            hu[canvas > 0] = HU_BONE + 200

    noise = rng.normal(0.0, noise_hu, size=(height, width)).astype(np.float32)
    hu += cv2.GaussianBlur(noise, (0, 0), 0.7) * 1.8
    return RenderedSlice(hu=hu, opening=opening, lesion_pixels=lesion_pixels)


def _draw_lesions(hu: np.ndarray, lung_mask: np.ndarray, lesions: Sequence[Lesion], z: float,
                  rng: np.random.Generator) -> int:
    """Blend the lesions cut by this slice into the lung; returns the visible lesion pixels."""
    visible = np.zeros(hu.shape, bool)
    for lesion in lesions:
        offset = (z - lesion.z) / lesion.z_radius
        if abs(offset) >= 1:
            continue
        radius = lesion.radius * float(np.sqrt(1 - offset * offset))
        if radius < 1.0:
            continue
        margin = int(np.ceil(radius * 2 + 4))
        x0, y0 = int(round(lesion.x)) - margin, int(round(lesion.y)) - margin
        size = 2 * margin + 1
        patch = np.zeros((size, size), np.float32)
        _fill_ellipse(patch, lesion.x - x0, lesion.y - y0, radius, radius * rng.uniform(0.75, 1.0))
        patch = cv2.GaussianBlur(patch, (0, 0), max(0.6, 0.2 * radius))
        ya, xa = max(0, y0), max(0, x0)
        yb, xb = min(hu.shape[0], y0 + size), min(hu.shape[1], x0 + size)
        if ya >= yb or xa >= xb:
            continue
        weight = patch[ya - y0:yb - y0, xa - x0:xb - x0] * lung_mask[ya:yb, xa:xb]
        texture = rng.uniform(-40, 40, size=weight.shape).astype(np.float32)
        region = hu[ya:yb, xa:xb]
        region += weight * (lesion.hu + texture - region)
        visible[ya:yb, xa:xb] |= weight > 0.5
    return int(np.count_nonzero(visible))


# --- writing -----------------------------------------------------------------------------


def encode_tiff(pixels: np.ndarray) -> bytes:
    """LZW TIFF with horizontal prediction; the same pixels always give the same bytes."""
    ok, encoded = cv2.imencode(".tif", pixels, TIFF_PARAMETERS)
    if not ok:
        raise ValueError("TIFF encoding failed")
    return encoded.tobytes()


def _dark_pixels(raw: np.ndarray) -> int:
    region = raw[REGION_ROWS[0]:REGION_ROWS[1], REGION_COLS[0]:REGION_COLS[1]]
    return int(np.count_nonzero(region < DARK_BELOW))


def _bad_file(kind: str, raw: np.ndarray) -> tuple[bytes, str]:
    """Bytes of a bad slice and the field a reader should name."""
    if kind == "eight_bit":
        return encode_tiff(np.clip(raw // 16, 0, 255).astype(np.uint8)), "BitsPerSample"
    if kind == "other_size":
        return encode_tiff(cv2.resize(raw, (256, 256), interpolation=cv2.INTER_AREA)), "ImageWidth/ImageLength"
    if kind == "not_tiff":
        ok, png = cv2.imencode(".png", raw)
        return png.tobytes(), "file"
    raise ValueError(f"unknown bad file kind {kind!r}")


def _write_series(task: tuple[str, SeriesSpec, int]) -> dict[str, Any]:
    """Draw and write one series; return its manifest entry."""
    out_dir, spec, seed = task
    anatomy = _anatomy(np.random.default_rng([seed, 1, spec.patient_index]), spec.covid)
    rng = np.random.default_rng([seed, 2, spec.patient_index, SERIES_NAMES.index(spec.series)])
    noise_hu = float(rng.uniform(6, 10))
    folder = Path(out_dir) / spec.folder
    slices = []
    raw = None
    for i in range(spec.num_slices):
        # A one-slice series is a single slice from the middle of the chest.
        z = 0.5 if spec.num_slices == 1 else (i + 0.5) / spec.num_slices
        rendered = render_slice(anatomy, z, rng, noise_hu)
        raw = hu_to_raw(rendered.hu)
        name = slice_name(i + 1)
        _write_atomic(folder / name, encode_tiff(raw))
        lesion = rendered.lesion_pixels >= VISIBLE_LESION_PIXELS
        if spec.covid:
            label = "covid" if lesion else None
        else:
            label = "normal" if rendered.opening >= LABELLED_OPENING else None
        if spec.bad == "one_slice":
            label = None
        slices.append(dict(file=f"{spec.folder}/{name}", index=i, z=round(z, 6),
                           lung_open=round(rendered.opening, 6), dark_pixels=_dark_pixels(raw),
                           lesion_pixels=rendered.lesion_pixels, label=label))
    bad_files = []
    if spec.bad == "one_slice":
        bad_files.append(dict(kind="one_slice", path=spec.folder, field="slices"))
    elif spec.bad:
        data, field_name = _bad_file(spec.bad, raw)
        name = slice_name(spec.num_slices + 1)
        _write_atomic(folder / name, data)
        bad_files.append(dict(kind=spec.bad, path=f"{spec.folder}/{name}", field=field_name))
    return dict(asdict(spec), folder=spec.folder, noise_hu=round(noise_hu, 4), slices=slices,
                bad_files=bad_files, lesions=[asdict(lesion) for lesion in anatomy.lesions])


def _csv_rows(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    for entry in entries:
        for item in entry["slices"]:
            if item["label"]:
                stem = Path(item["file"]).name
                rows.append((f"{entry['group']}_{entry['patient_id']}_{entry['series']}_{stem}", item["label"]))
    return rows


def generate(out_dir: str | os.PathLike, scale: str = "tiny", seed: int = 0, workers: int = 1,
             progress: bool = False) -> dict[str, Any]:
    """Write the synthetic COVID-CTset under ``out_dir`` and return its manifest.

    The manifest (also ``out_dir/synthetic_ct.json``, written last) has ``scale``, ``seed``,
    ``counts``, ``files`` and one entry per series with its slices (``file``, ``index``,
    ``z``, ``lung_open``, ``dark_pixels``, ``lesion_pixels``, ``label``), its ``bad_files``
    (``kind``, ``path``, ``field``) and the patient's lesions.
    """
    return write_layout(CT, out_dir, scale=scale, seed=seed, workers=workers, progress=progress)


def _finish_layout(out: Path, entries: list[dict[str, Any]], specs: Sequence[SeriesSpec], scale: str,
                   seed: int) -> dict[str, Any]:
    """Write the labelled-slice CSV; the manifest's fields after ``scale`` and ``seed``."""
    rows = _csv_rows(entries)
    _write_atomic(out / LABELS_CSV, _csv_bytes(("filename", "class"), rows))
    files = [LABELS_CSV] + [item["file"] for entry in entries for item in entry["slices"]]
    files += [bad["path"] for entry in entries for bad in entry["bad_files"] if bad["kind"] != "one_slice"]
    patients = {(e["patient_id"], e["covid"]) for e in entries}
    return dict(
        counts=dict(
            covid_patients=sum(1 for _, covid in patients if covid),
            normal_patients=sum(1 for _, covid in patients if not covid),
            series=len(entries), slices=sum(len(e["slices"]) for e in entries),
            labelled_covid=sum(1 for _, label in rows if label == "covid"),
            labelled_normal=sum(1 for _, label in rows if label == "normal"),
            bad_files=sum(len(e["bad_files"]) for e in entries),
        ),
        files=sorted(files), series=entries,
    )


def write_dicom_series(folder: str | os.PathLike, raw_slices: np.ndarray, *, patient_id: str,
                       series_number: int = 2, seed: int = 0, spacing: float = 5.0,
                       shuffle_names: bool = True) -> list[Path]:
    """Write ``[S, H, W]`` raw slices (HU + 1024) as one DICOM CT series, the way scanners do.

    Stored values are the raw values with RescaleIntercept -1024 (BitsStored 12 as in
    COVID-CTset); InstanceNumber and ImagePositionPatient give the order. With
    ``shuffle_names`` the file names do not follow the slice order, so readers must sort by
    the header. UIDs are derived from ``seed``, ``patient_id`` and ``series_number``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    raw_slices = np.asarray(raw_slices)
    if raw_slices.ndim != 3 or raw_slices.dtype != np.uint16:
        raise ValueError(f"expected [S, H, W] uint16 raw slices, got {raw_slices.dtype} {raw_slices.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = [str(seed), patient_id, str(series_number)]
    study_uid = generate_uid(entropy_srcs=key[:2] + ["study"])
    series_uid = generate_uid(entropy_srcs=key + ["series"])
    order = np.random.default_rng([seed, series_number]).permutation(len(raw_slices)) if shuffle_names \
        else np.arange(len(raw_slices))
    paths = []
    for index, pixels in enumerate(raw_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=key + [str(index)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-250.0, -250.0, -spacing * index]
        ds.SliceThickness = spacing
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -HU_OFFSET
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = pixels.astype("<u2").tobytes()
        path = folder / f"{int(order[index]) + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def describe(manifest: dict[str, Any], out: Path, seconds: float) -> str:
    """The summary ``caaxr-make-synthetic --layout ct`` prints."""
    counts = manifest["counts"]
    return (f"synthetic CT ({manifest['scale']}, seed {manifest['seed']}) in {out}: "
            + ", ".join(f"{name} {value}" for name, value in counts.items()) + f"; {seconds:.1f} s")


CT = register_layout(Layout(
    name="ct", title="synthetic CT", unit="series", manifest_name=MANIFEST_NAME, scales=SCALES, plan=plan,
    task=lambda out, spec, scale, seed: (out, spec, seed), write=_write_series, finish=_finish_layout,
    describe=describe), __name__)


def main(argv: Sequence[str] | None = None) -> int:
    """``caaxr-make-synthetic --layout ct``."""
    from caaxr_tf.data.synthetic import main as make_synthetic

    return make_synthetic(["--layout", "ct", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
