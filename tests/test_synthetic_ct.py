"""The synthetic COVID-CTset: layout, values in HU + 1024, selection has work, lesions, determinism."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from caaxr_tf.ct import select_slices
from caaxr_tf.ct.select import select_series
from caaxr_tf.data.ct_series import find_ct_series, read_ct_tiff
from caaxr_tf.data.synthetic_ct import LABELS_CSV, MANIFEST_NAME, SCALES, VISIBLE_LESION_PIXELS, generate, plan


@pytest.fixture(scope="module")
def ct_tiny(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic_ct")
    return root, generate(root, "tiny", seed=0)


def good_series(manifest: dict) -> list[dict]:
    return [entry for entry in manifest["series"] if entry["bad"] != "one_slice"]


def test_layout_and_counts(ct_tiny):
    root, manifest = ct_tiny
    counts = manifest["counts"]
    tiny = SCALES["tiny"]
    assert (counts["covid_patients"], counts["normal_patients"]) == (tiny["covid"], tiny["normal"])
    assert counts["bad_files"] == 4
    assert {bad["kind"] for e in manifest["series"] for bad in e["bad_files"]} == {
        "eight_bit", "not_tiff", "other_size", "one_slice"}
    for entry in good_series(manifest):
        low, high = tiny["slices"]
        assert low <= entry["num_slices"] <= high
        assert entry["folder"] == f"{entry['group']}/{entry['patient_id']}/{entry['series']}"
        assert entry["group"].startswith("covid" if entry["covid"] else "normal")
        names = sorted(p.name for p in (root / entry["folder"]).glob("IM*.tif"))
        expected = [f"IM{n:05d}.tif" for n in range(1, entry["num_slices"] + 1)]
        assert names == expected + [Path(b["path"]).name for b in entry["bad_files"]]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(
        manifest["files"] + [MANIFEST_NAME])


def test_slices_are_16_bit_hu_plus_1024(ct_tiny):
    root, manifest = ct_tiny
    entry = good_series(manifest)[0]
    middle = entry["slices"][len(entry["slices"]) // 2]
    pixels = read_ct_tiff(root / middle["file"])
    assert pixels.dtype == np.uint16 and pixels.shape == (512, 512)
    assert abs(int(np.median(pixels[:40, :40])) - 24) <= 10  # air, -1000 HU
    soft = pixels[(pixels > 950) & (pixels < 1200)]
    assert soft.size > 50_000 and abs(int(np.median(soft)) - (1024 + 40)) <= 15  # soft tissue, 40 HU
    region = pixels[240:340, 120:370]
    lung = region[region < 300]
    assert lung.size > 5000 and 100 <= np.median(lung) <= 300  # lung ~ -850 HU
    assert pixels.max() > 1700  # bone


def test_stored_pixels_give_the_manifest_counts_and_selection_has_work(ct_tiny):
    root, manifest = ct_tiny
    for entry in good_series(manifest):
        scan = find_ct_series(root / entry["folder"])
        outcome = select_series(scan.series[0])
        assert outcome.selection.counts.tolist() == [s["dark_pixels"] for s in entry["slices"]]
        kept = outcome.selection.kept
        # The lung opens and closes: both ends are discarded, the middle is kept.
        assert not kept[0] and not kept[-1] and kept[len(kept) // 2]
        assert 0.3 <= kept.mean() <= 0.85
        openings = np.array([s["lung_open"] for s in entry["slices"]])
        assert openings[kept].min() > openings[~kept].min()
        assert openings[kept].mean() > 0.8 > openings[~kept].mean()


def test_lesions_and_labelled_slices(ct_tiny):
    root, manifest = ct_tiny
    with open(root / LABELS_CSV, newline="") as handle:
        rows = {row["filename"]: row["class"] for row in csv.DictReader(handle)}
    radii = []
    for entry in manifest["series"]:
        radii += [lesion["radius"] for lesion in entry["lesions"]] if entry["series"] == "SR_2" else []
        for item in entry["slices"]:
            name = f"{entry['group']}_{entry['patient_id']}_{entry['series']}_{Path(item['file']).name}"
            if entry["bad"] == "one_slice":
                assert name not in rows
            elif entry["covid"]:
                visible = item["lesion_pixels"] >= VISIBLE_LESION_PIXELS
                assert rows.get(name) == ("covid" if visible else None)
            else:
                assert item["lesion_pixels"] == 0
                assert rows.get(name) == ("normal" if item["lung_open"] >= 0.5 else None)
    assert set(rows.values()) == {"covid", "normal"}
    radii = np.array(radii)
    assert (radii < 6).sum() > (radii > 15).sum() >= 0 and (radii < 6).mean() > 0.4  # many tiny
    lesion_pixels = [i["lesion_pixels"] for e in manifest["series"] for i in e["slices"] if i["lesion_pixels"]]
    assert min(lesion_pixels) < 60 and max(lesion_pixels) > 400  # several sizes


def test_same_seed_same_bytes_in_other_processes(ct_tiny, tmp_path):
    root, manifest = ct_tiny
    again = generate(tmp_path, "tiny", seed=0, workers=2)
    assert again == manifest
    for relative in manifest["files"] + [MANIFEST_NAME]:
        assert hashlib.sha256((root / relative).read_bytes()).digest() == \
            hashlib.sha256((tmp_path / relative).read_bytes()).digest(), relative
    assert plan("tiny", 1) != plan("tiny", 0)
    assert [s.num_slices for s in plan("small", 0)] == [s.num_slices for s in plan("small", 0)]


def test_small_scale_plan():
    specs = plan("small", 0)
    patients = {s.patient_id: s.covid for s in specs}
    assert sum(patients.values()) == 10 and len(patients) == 20
    assert all(30 <= s.num_slices <= 60 for s in specs if s.bad != "one_slice")
    assert {s.group for s in specs} == {"covid1", "covid2", "normal1", "normal2"}


def test_selection_on_a_volume_equals_selection_on_files(ct_tiny):
    root, manifest = ct_tiny
    entry = good_series(manifest)[-1]
    volume = np.stack([read_ct_tiff(root / s["file"]) for s in entry["slices"]])
    assert select_slices(volume).counts.tolist() == [s["dark_pixels"] for s in entry["slices"]]
