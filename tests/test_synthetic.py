"""The synthetic dataset: counts, layout, pixel storage, lesions and determinism."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from caaxr_tf.data import synthetic
from caaxr_tf.data.synthetic import SCALES, generate, plan, render

REPO = Path(__file__).resolve().parents[1]
CHEXPERT_COLUMNS = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]
BIMCV_PATH = re.compile(
    r"bimcv/(sub-S\d{5})/(ses-E\d{5})/mod-rx/\1_\2_run-1_bp-chest_vp-(pa|ap|ll)_(cr|dx)\.png"
)
CHEXPERT_PATH = re.compile(
    r"chexpert/CheXpert-v1\.0-small/(train|valid)/patient(\d{5})/study\d+/"
    r"(view1_frontal|view2_lateral)\.jpg"
)


@pytest.fixture(scope="module")
def manifest(tiny_data_root) -> dict:
    return json.loads((tiny_data_root / "synthetic.json").read_text())


def _images(manifest: dict, *categories: str) -> list[dict]:
    return [e for e in manifest["images"] if e["category"] in categories]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _display(root: Path, entry: dict) -> np.ndarray:
    """Stored pixels un-inverted and scaled to [0, 1]."""
    pixels = cv2.imread(str(root / entry["path"]), cv2.IMREAD_UNCHANGED).astype(np.float64)
    top = 2 ** entry["bit_depth"] - 1
    return (top - pixels if entry["invert"] else pixels) / top


def test_counts_match_manifest_and_scale(tiny_data_root, manifest):
    counts = SCALES["tiny"]
    assert manifest["scale"] == "tiny" and manifest["seed"] == 0
    assert manifest["counts"] == counts
    assert counts == dict(covid_boxes=30, covid_no_boxes=10, bimcv_lateral=4, bimcv_unlisted=4,
                          chexpert_healthy=20, chexpert_pneumonia=15, chexpert_other=15,
                          chexpert_uncertain=5, chexpert_lateral=5)
    assert Counter(e["category"] for e in manifest["images"]) == counts

    pngs = sorted(p.relative_to(tiny_data_root).as_posix() for p in tiny_data_root.glob("bimcv/**/*.png"))
    sidecars = sorted(tiny_data_root.glob("bimcv/**/*.json"))
    jpgs = sorted(p.relative_to(tiny_data_root).as_posix() for p in tiny_data_root.glob("chexpert/**/*.jpg"))
    assert len(pngs) == len(sidecars) == 30 + 10 + 4 + 4
    assert len(jpgs) == 20 + 15 + 15 + 5 + 5
    assert pngs == sorted(e["path"] for e in manifest["images"] if e["source"] == "bimcv")
    assert jpgs == sorted(e["path"] for e in manifest["images"] if e["source"] == "chexpert")
    # Nothing left under a temporary name; the manifest lists exactly what is on disk.
    on_disk = {p.relative_to(tiny_data_root).as_posix() for p in tiny_data_root.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {"synthetic.json"}
    assert not [p for p in on_disk if Path(p).name.startswith(".")]
    assert manifest["boxes"] == sum(len(e["boxes"]) for e in manifest["images"])


def test_csv_columns_exactly_as_in_the_contract(tiny_data_root):
    assert _read_csv(tiny_data_root / "caaxr/BoundingBox.csv")[0] == [
        "image_id", "finding", "x", "y", "width", "height"]
    assert _read_csv(tiny_data_root / "caaxr/Study-Level_Annotations.csv")[0] == ["image_id", "findings"]
    for split in ("train", "valid"):
        columns, _ = _read_csv(tiny_data_root / f"chexpert/CheXpert-v1.0-small/{split}.csv")
        assert columns == CHEXPERT_COLUMNS


def test_caaxr_tables_list_exactly_the_covid_pool(tiny_data_root, manifest):
    _, study = _read_csv(tiny_data_root / "caaxr/Study-Level_Annotations.csv")
    _, boxes = _read_csv(tiny_data_root / "caaxr/BoundingBox.csv")
    with_boxes = {e["image_id"]: e for e in _images(manifest, "covid_boxes")}
    without = {e["image_id"] for e in _images(manifest, "covid_no_boxes")}
    assert len(study) == 40 and {r["image_id"] for r in study} == set(with_boxes) | without
    assert {r["image_id"] for r in boxes} == set(with_boxes)
    assert len(boxes) == manifest["boxes"]
    for row in study:
        if row["image_id"] in without:
            assert row["findings"] == "No finding"
        else:
            listed = row["findings"].split(";")
            assert listed == with_boxes[row["image_id"]]["findings"]
            assert set(listed) == {b["finding"] for b in with_boxes[row["image_id"]]["boxes"]}
    for row in boxes:
        box = {k: int(row[k]) for k in ("x", "y", "width", "height")}
        assert dict(box, finding=row["finding"]) in with_boxes[row["image_id"]]["boxes"]
    assert all(1 <= len(e["boxes"]) <= 3 for e in with_boxes.values())
    opacity = [e for e in with_boxes.values()
               if {"Consolidation", "Ground glass opacity"} & set(e["findings"])]
    assert 15 <= len(opacity) < 30
    assert {b["finding"] for e in with_boxes.values() for b in e["boxes"]} == set(synthetic.FINDINGS)
    # Laterals and unlisted frontal images appear in neither table.
    excluded = {e["image_id"] for e in _images(manifest, "bimcv_lateral", "bimcv_unlisted")}
    assert len(excluded) == 8 and not excluded & {r["image_id"] for r in study}


def test_bimcv_layout_and_sidecars(tiny_data_root, manifest):
    sessions_per_subject: Counter = Counter()
    for entry in _images(manifest, "covid_boxes", "covid_no_boxes", "bimcv_lateral", "bimcv_unlisted"):
        match = BIMCV_PATH.fullmatch(entry["path"])
        assert match, entry["path"]
        subject, session, view, modality = match.groups()
        assert entry["patient_id"] == subject and entry["study_id"] == session
        assert entry["image_id"] == Path(entry["path"]).stem
        assert (view == "ll") == (entry["category"] == "bimcv_lateral")
        if view != "ll":
            sessions_per_subject[subject] += 1
        tags = json.loads((tiny_data_root / entry["path"]).with_suffix(".json").read_text())
        value = lambda tag: tags[tag]["Value"][0]  # noqa: E731
        assert value("00280101") == entry["bit_depth"] in (12, 16)
        assert value("20500020") == ("INVERSE" if entry["invert"] else "IDENTITY")
        assert tags["20500020"]["vr"] == "CS"
        assert value("00185101") == view.upper()
        assert value("00080060") == modality.upper()
        assert value("00100020") == subject
        pixels = cv2.imread(str(tiny_data_root / entry["path"]), cv2.IMREAD_UNCHANGED)
        assert pixels.dtype == np.uint16 and pixels.ndim == 2
        assert (value("00280010"), value("00280011")) == pixels.shape == (entry["height"], entry["width"])
        assert 400 <= min(pixels.shape) and max(pixels.shape) <= 640 and pixels.shape[0] != pixels.shape[1]
    assert max(sessions_per_subject.values()) >= 2 and min(sessions_per_subject.values()) == 1
    # A lateral is an extra image of a session that also has a frontal one.
    frontal_sessions = {e["study_id"] for e in _images(manifest, "covid_boxes", "covid_no_boxes", "bimcv_unlisted")}
    assert {e["study_id"] for e in _images(manifest, "bimcv_lateral")} <= frontal_sessions


def test_bimcv_pixel_storage(tiny_data_root, manifest):
    frontal = _images(manifest, "covid_boxes", "covid_no_boxes", "bimcv_unlisted")
    for entry in frontal:
        maximum = int(cv2.imread(str(tiny_data_root / entry["path"]), cv2.IMREAD_UNCHANGED).max())
        if entry["bit_depth"] == 12:
            assert maximum <= 4095
        else:
            assert maximum > 4095
    assert Counter(e["bit_depth"] for e in _images(manifest, "covid_boxes")) == {12: 15, 16: 15}
    assert sum(e["invert"] for e in _images(manifest, "covid_boxes")) == 9
    assert sum(e["invert"] for e in frontal) == 9 + 3 + 1


def test_inverted_images_look_normal_once_uninverted(tiny_data_root, manifest):
    specs = plan("tiny", 0)
    reference = None
    inverted = []
    for entry in _images(manifest, "covid_no_boxes", "bimcv_unlisted", "covid_boxes"):
        display = _display(tiny_data_root, entry)
        lungs = render(specs[entry["index"]], 0).lung_mask
        h, w = display.shape
        mediastinum = display[int(0.2 * h):int(0.45 * h), int(0.47 * w):int(0.53 * w)]
        assert display[lungs].mean() + 0.2 < mediastinum.mean(), entry["path"]
        small = cv2.resize(display, (48, 48), interpolation=cv2.INTER_AREA)
        if entry["invert"]:
            raw = cv2.resize(cv2.imread(str(tiny_data_root / entry["path"]), cv2.IMREAD_UNCHANGED)
                             .astype(np.float64), (48, 48), interpolation=cv2.INTER_AREA)
            inverted.append((small, raw))
        elif reference is None:
            reference = small
    assert len(inverted) >= 5
    for small, raw in inverted:
        assert np.corrcoef(small.ravel(), reference.ravel())[0, 1] > 0.8
        assert np.corrcoef(raw.ravel(), reference.ravel())[0, 1] < -0.8


def test_boxes_lie_in_the_lungs_and_hold_a_brighter_lesion(tiny_data_root, manifest):
    specs = plan("tiny", 0)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (9, 9))
    for entry in _images(manifest, "covid_boxes"):
        display = _display(tiny_data_root, entry)
        h, w = display.shape
        lungs = render(specs[entry["index"]], 0).lung_mask
        core = cv2.erode(lungs.astype(np.uint8), kernel) > 0
        occupied = np.zeros((h, w), np.uint8)
        for box in entry["boxes"]:
            x, y, bw, bh = box["x"], box["y"], box["width"], box["height"]
            occupied[max(0, y - 6):y + bh + 6, max(0, x - 6):x + bw + 6] = 1
        for box in entry["boxes"]:
            x, y, bw, bh = box["x"], box["y"], box["width"], box["height"]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and bw > 0 and bh > 0
            assert lungs[y:y + bh, x:x + bw].all(), (entry["path"], box)
            near = np.zeros((h, w), bool)
            near[max(0, y - 30):y + bh + 30, max(0, x - 30):x + bw + 30] = True
            ring = near & core & (occupied == 0)
            assert ring.sum() > 200
            inside = display[y:y + bh, x:x + bw].mean()
            assert inside > display[ring].mean() + 0.05, (entry["path"], box)


def test_chexpert_tables_and_images(tiny_data_root, manifest):
    _, train = _read_csv(tiny_data_root / "chexpert/CheXpert-v1.0-small/train.csv")
    _, valid = _read_csv(tiny_data_root / "chexpert/CheXpert-v1.0-small/valid.csv")
    rows = {"chexpert/" + r["Path"]: r for r in train + valid}
    entries = [e for e in manifest["images"] if e["source"] == "chexpert"]
    assert len(rows) == len(train) + len(valid) == len(entries) == 60
    assert 1 <= len(valid) < len(train)
    lateral_studies = set()
    for entry in entries:
        match = CHEXPERT_PATH.fullmatch(entry["path"])
        assert match, entry["path"]
        split, number, view = match.groups()
        assert (int(number) >= 64541) == (split == "valid") == (entry["split"] == "valid")
        row = rows[entry["path"]]
        assert entry["image_id"] == entry["path"][len("chexpert/CheXpert-v1.0-small/"):-len(".jpg")]
        assert row["Frontal/Lateral"] == ("Lateral" if view == "view2_lateral" else "Frontal")
        assert (view == "view2_lateral") == (entry["category"] == "chexpert_lateral")
        assert row["AP/PA"] == ("" if view == "view2_lateral" else entry["view"].upper())
        labels = {c: row[c] for c in CHEXPERT_COLUMNS[5:]}
        assert set(labels.values()) <= {"1.0", "0.0", "-1.0", ""}
        assert {k: (float(v) if v else None) for k, v in labels.items()} == entry["labels"]
        if split == "valid":
            assert "" not in labels.values() and "-1.0" not in labels.values()
        pathologies = {k: v for k, v in labels.items() if k not in ("No Finding", "Support Devices")}
        category = entry["category"]
        if category == "chexpert_healthy":
            assert labels["No Finding"] == "1.0" and "1.0" not in pathologies.values()
        elif category == "chexpert_pneumonia":
            assert labels["Pneumonia"] == "1.0" and labels["No Finding"] != "1.0"
        elif category == "chexpert_other":
            assert labels["Pneumonia"] in ("", "0.0")
            assert "1.0" in (labels["Cardiomegaly"], labels["Pleural Effusion"])
        elif category == "chexpert_uncertain":
            assert "-1.0" in pathologies.values() and "1.0" not in pathologies.values()
            assert labels["No Finding"] != "1.0"
        else:
            lateral_studies.add(entry["study_id"])
        pixels = cv2.imread(str(tiny_data_root / entry["path"]), cv2.IMREAD_UNCHANGED)
        assert pixels.dtype == np.uint8 and pixels.ndim == 2
        assert 280 <= pixels.shape[1] <= 340 and 330 <= pixels.shape[0] <= 400
    frontal_studies = {e["study_id"] for e in entries if e["category"] != "chexpert_lateral"}
    assert len(lateral_studies) == 5 and lateral_studies <= frontal_studies
    studies_per_patient = Counter(e["patient_id"] for e in entries if e["category"] != "chexpert_lateral")
    assert max(studies_per_patient.values()) >= 2
    assert len(studies_per_patient) == manifest["chexpert_patients"]


def test_pneumonia_is_a_one_sided_consolidation(tiny_data_root, manifest):
    specs = plan("tiny", 0)

    def asymmetry(entry: dict) -> float:
        pixels = cv2.imread(str(tiny_data_root / entry["path"]), cv2.IMREAD_UNCHANGED) / 255.0
        lungs = render(specs[entry["index"]], 0).lung_mask
        left = lungs.copy()
        left[:, pixels.shape[1] // 2:] = False
        return abs(float(pixels[left].mean() - pixels[lungs & ~left].mean()))

    healthy = [asymmetry(e) for e in _images(manifest, "chexpert_healthy")]
    pneumonia = [asymmetry(e) for e in _images(manifest, "chexpert_pneumonia")]
    assert max(healthy) < 0.04 < min(pneumonia)


def test_paper_scale_covers_the_protocol_counts():
    specs = plan("paper", 0)
    categories = Counter(s.category for s in specs)
    assert categories["covid_boxes"] == 1656
    assert categories["covid_boxes"] + categories["covid_no_boxes"] == 2388
    frontal = [s for s in specs if s.source == "chexpert" and s.view != "lateral"]
    healthy = sum(s.label("No Finding") == "1.0" for s in frontal)
    pneumonia = sum(s.label("Pneumonia") == "1.0" for s in frontal)
    other = sum(s.category == "chexpert_other" for s in frontal)
    assert healthy >= 2406 and pneumonia >= 2404 and other >= 2404
    assert len({s.image_id for s in specs}) == len(specs)
    assert SCALES["small"]["covid_boxes"] == 300 and SCALES["small"]["chexpert_lateral"] == 50


def test_same_seed_same_bytes_with_two_workers_and_stale_files_removed(tiny_data_root, tmp_path):
    out = tmp_path / "again"
    stale = out / "bimcv/sub-S99999/ses-E99999/mod-rx/sub-S99999_ses-E99999_run-1_bp-chest_vp-pa_dx.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (out / "notes.txt").write_text("not ours")
    (out / "synthetic.json").write_text(json.dumps({"files": [stale.relative_to(out).as_posix()]}))

    generate(out, scale="tiny", seed=0, workers=2)
    assert not stale.exists() and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    first, second = _all_files(tiny_data_root), _all_files(out)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []


def test_other_seed_differs_and_cli_summary(tiny_data_root, tmp_path):
    out = tmp_path / "seed1"
    result = subprocess.run(
        [sys.executable, "tools/make_synthetic.py", "--out", str(out), "--seed", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=""),
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"covid_boxes\s+30\n", result.stdout)
    assert re.search(r"total\s+108\n", result.stdout)
    other = json.loads((out / "synthetic.json").read_text())
    assert other["seed"] == 1 and other["counts"] == SCALES["tiny"]
    first, second = _all_files(tiny_data_root), _all_files(out)
    for name in ("caaxr/BoundingBox.csv", "chexpert/CheXpert-v1.0-small/train.csv"):
        assert first[name] != second[name]
    images = [p for p in first if p.endswith((".png", ".jpg")) and p in second]
    assert len(images) >= 10
    assert sum(first[p] != second[p] for p in images) == len(images)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "image.png"

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        synthetic._write_atomic(target, b"\x89PNG data")
    assert list(target.parent.iterdir()) == []


def test_realistic_scale_plan_has_real_depths_and_a_third_inverted():
    specs = plan("realistic", 0)
    categories = Counter(s.category for s in specs)
    assert dict(categories) == {name: 3 * count for name, count in SCALES["tiny"].items()}
    assert len(specs) == 324 and len({s.image_id for s in specs}) == 324
    bimcv = [s for s in specs if s.source == "bimcv"]
    assert len(bimcv) == 144 and all(s.full_size and s.bit_depth == 12 for s in bimcv)
    for category in ("covid_boxes", "covid_no_boxes", "bimcv_lateral", "bimcv_unlisted"):
        members = [s for s in bimcv if s.category == category]
        assert sum(s.invert for s in members) == round(synthetic.INVERSE_SHARE * len(members))
    assert not any(s.full_size for s in specs if s.source == "chexpert")
    # the reduced scales keep their sizes and mixed depths (and so their bytes)
    tiny = plan("tiny", 0)
    assert not any(s.full_size for s in tiny)
    assert {s.bit_depth for s in tiny if s.source == "bimcv"} == {12, 16}


def test_realistic_bimcv_image_is_a_full_size_12_bit_png(tmp_path):
    spec = next(s for s in plan("realistic", 0) if s.category == "covid_boxes" and s.invert)
    entry = synthetic._write_one((str(tmp_path), spec, 0))
    path = tmp_path / spec.path
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert pixels.dtype == np.uint16 and pixels.shape == (entry["height"], entry["width"])
    low, high = synthetic.FULL_SIZE_LONG_SIDE
    assert low <= max(pixels.shape) <= high and pixels.shape[0] > pixels.shape[1]
    assert int(pixels.max()) <= 4095 and int(pixels.max()) > 3000  # 12 bits stored, most of the range used
    tags = json.loads(path.with_suffix(".json").read_text())
    assert tags["00280101"]["Value"] == [12] and tags["20500020"]["Value"] == ["INVERSE"]
    assert (tags["00280010"]["Value"][0], tags["00280011"]["Value"][0]) == pixels.shape
    assert entry["boxes"]
    for box in entry["boxes"]:
        assert 0 <= box["x"] and box["x"] + box["width"] <= pixels.shape[1]
        assert 0 <= box["y"] and box["y"] + box["height"] <= pixels.shape[0]
    # inverted: the stored lung fields (dark on film) are the bright values
    display = (4095.0 - pixels) / 4095.0
    assert display.mean() < 0.6
