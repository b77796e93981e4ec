"""Integration: the covid-chestxray protocols built from ../shared/data/covid-chestxray, with
counts checked against metadata.csv read independently here."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import cv2
import pytest

from caaxr_tf.config import load_config
from caaxr_tf.data import tfrecords as tfr

pytestmark = pytest.mark.realdata

FRONTAL = {"PA", "AP", "AP Supine", "AP semi erect"}


def metadata_rows(root: Path, unique: bool = False) -> list[dict[str, str]]:
    raw = (root / "metadata.csv").read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    rows = list(csv.DictReader(text.splitlines()))
    if unique:  # a few file names are listed twice (for two patient ids): the first row counts
        first = {}
        for row in rows:
            first.setdefault(row["filename"], row)
        rows = list(first.values())
    return rows


def tokens(finding: str) -> set[str]:
    return {t.strip().lower() for t in re.split(r"[,/]", finding) if t.strip()}


@pytest.fixture(scope="module")
def built(covid_chestxray_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("covid_cxr_tfrecords")
    summaries = tfr.build_tfrecords(
        covid_chestxray_root, out, source="covid-chestxray", workers=2, progress=False, log=lambda line: None
    )
    return out, summaries


def test_class_counts_match_metadata(built, covid_chestxray_root):
    _, summaries = built
    present = set(p.name for p in (covid_chestxray_root / "images").iterdir())
    listed = [
        r for r in metadata_rows(covid_chestxray_root)
        if r["modality"] == "X-ray" and r["view"] in FRONTAL and r["filename"] in present
    ]
    assert len(listed) == 531  # as the collection's README says, counting the duplicate rows
    frontal = [
        r for r in metadata_rows(covid_chestxray_root, unique=True)
        if r["modality"] == "X-ray" and r["view"] in FRONTAL and r["filename"] in present
    ]
    duplicates = [s for s in summaries["2class"]["skipped"] if "duplicate" in s["reason"]]
    assert len(frontal) == 531 - len(duplicates)
    covid = [r for r in frontal if "covid-19" in tokens(r["finding"])]
    no_finding = [r for r in frontal if tokens(r["finding"]) == {"no finding"}]
    vocabulary = set(
        load_config("protocols")["covid-chestxray"]["3class"]["classes"]["other_pneumonia"]["findings"]
    )
    other = [r for r in frontal if "covid-19" not in tokens(r["finding"]) and tokens(r["finding"]) & vocabulary]

    assert summaries["2class"]["counts"]["total"] == {"covid": len(covid), "non_covid": len(frontal) - len(covid)}
    assert summaries["3class"]["counts"]["total"] == {
        "covid": len(covid), "other_pneumonia": len(other), "no_finding": len(no_finding)
    }
    assert len(no_finding) == 19
    left_out = len(frontal) - len(covid) - len(other) - len(no_finding)
    assert sum(v for k, v in summaries["3class"]["excluded"].items() if "matches no class" in k) == left_out


def test_lung_box_protocol_matches_the_coco_file(built, covid_chestxray_root):
    out, summaries = built
    coco = json.loads((covid_chestxray_root / "annotations" / "lung_bounding_boxes.json").read_text())
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    # boxes drawn on an image of another size than the file cannot be placed: left out
    mismatched = set()
    for image in coco["images"]:
        pixels = cv2.imread(str(covid_chestxray_root / "images" / image["file_name"]), cv2.IMREAD_UNCHANGED)
        if pixels is not None and pixels.shape[:2] != (image["height"], image["width"]):
            mismatched.add(image["file_name"])
    valid = Counter()
    for annotation in coco["annotations"]:
        box = annotation["bbox"]
        if box and all(v is not None for v in box):
            valid[files[annotation["image_id"]]] += 1
    frontal = {
        r["filename"] for r in metadata_rows(covid_chestxray_root)
        if r["modality"] == "X-ray" and r["view"] in FRONTAL
    }
    expected = {
        name for name in valid
        if name in frontal and name not in mismatched and (covid_chestxray_root / "images" / name).exists()
    }
    assert summaries["seg"]["counts"]["total"] == {"lungs": len(expected)}
    # the two null boxes and the mismatched sizes are reported with the file and field
    reports = [s for s in summaries["seg"]["skipped"] if s["path"].endswith("lung_bounding_boxes.json")]
    assert sum("bbox" in s["field"] and "null" in s["reason"] for s in reports) == 2
    assert sum("width" in s["field"] for s in reports) == len(mismatched) == 3


def test_absent_images_are_reported(built, covid_chestxray_root):
    """Every frontal X-ray row whose file is absent is reported, with its row number, and
    nothing else is reported as absent (the collection lacks 11 such files)."""
    _, summaries = built
    present = set(p.name for p in (covid_chestxray_root / "images").iterdir())
    rows = metadata_rows(covid_chestxray_root)
    frontal_absent = {
        (f"row {number}: filename", r["filename"])
        for number, r in enumerate(rows, start=2)  # the header is row 1
        if r["filename"] not in present and r["modality"] == "X-ray" and r["view"] in FRONTAL
    }
    reported = {
        (s["field"], s["reason"].rsplit(": ", 1)[-1]) for s in summaries["2class"]["skipped"]
        if s["path"] == str(covid_chestxray_root / "metadata.csv") and "not found" in s["reason"]
    }
    assert len(frontal_absent) == 11
    assert reported == frontal_absent
    assert any(r["filename"] not in present for r in rows if r["view"] not in FRONTAL)  # absent, not frontal: not reported


def test_manifest_carries_view_sex_and_age(built, covid_chestxray_root):
    """Additive manifest columns for per-slice scoring (caaxr score --slice-by sex,view,age)."""
    out, _ = built
    first = {r["filename"]: r for r in metadata_rows(covid_chestxray_root, unique=True)}
    with open(out / "2class" / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"view", "sex", "age"} <= set(rows[0])
    for row in rows:
        meta = first[row["image_id"]]
        assert row["view"] == meta["view"].strip().lower()
        assert row["sex"] == meta["sex"].strip() and row["age"] == meta["age"].strip(), row["image_id"]
    assert {r["sex"] for r in rows} >= {"M", "F"}
