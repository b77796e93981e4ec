"""Bad inputs end to end: each is reported in summary.json with its file and field, the rest is
written; a wrong CSV schema stops the run before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.records import SchemaError


def build(data_root: Path, out: Path, **kwargs) -> dict:
    return tfr.build_tfrecords(data_root, out, workers=1, progress=False, log=lambda line: None, **kwargs)


def entries(root: Path, category: str) -> list[dict]:
    manifest = json.loads((root / "synthetic.json").read_text())
    return [e for e in manifest["images"] if e["category"] == category]


def edit_csv(path: Path, edit) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = list(reader.fieldnames), list(reader)
    fields, rows = edit(fields, rows)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def damaged(tiny_data_root, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(tiny_data_root, root)
    boxed = entries(root, "covid_boxes")
    unboxed = entries(root, "covid_no_boxes")
    healthy = entries(root, "chexpert_healthy")
    damage: dict[str, Path] = {}

    truncated = root / boxed[0]["path"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    damage["truncated"] = truncated

    corrupt = root / unboxed[0]["path"]
    data = bytearray(corrupt.read_bytes())
    data[60:-20] = bytes(len(data) - 80)  # keep the signature and IEND, wipe the image data
    corrupt.write_bytes(bytes(data))
    damage["corrupt"] = corrupt

    empty = root / healthy[0]["path"]
    empty.write_bytes(b"")
    damage["empty"] = empty

    no_sidecar = (root / boxed[1]["path"]).with_suffix(".json")
    no_sidecar.unlink()
    damage["missing_sidecar"] = no_sidecar

    bad_sidecar = (root / unboxed[1]["path"]).with_suffix(".json")
    bad_sidecar.write_text("{not json", encoding="utf-8")
    damage["malformed_sidecar"] = bad_sidecar

    # a second copy of an image under another subject folder: same image id
    original = root / boxed[2]["path"]
    copy_dir = root / "bimcv" / "sub-S99999" / "ses-E99999" / "mod-rx"
    copy_dir.mkdir(parents=True)
    shutil.copy(original, copy_dir / original.name)
    shutil.copy(original.with_suffix(".json"), copy_dir / original.with_suffix(".json").name)
    damage["duplicate"] = copy_dir / original.name

    target = boxed[3]
    width, height = target["width"], target["height"]

    def add_bad_boxes(fields, rows):
        bad = [
            {"image_id": target["image_id"], "finding": "Nodule", "x": str(width - 5), "y": "10", "width": "40", "height": "20"},
            {"image_id": target["image_id"], "finding": "Nodule", "x": "-4", "y": "10", "width": "40", "height": "20"},
            {"image_id": target["image_id"], "finding": "Nodule", "x": "", "y": "10", "width": "40", "height": "20"},
        ]
        return fields, rows + bad

    with open(root / "caaxr" / "BoundingBox.csv", newline="", encoding="utf-8") as handle:
        first_bad_row = sum(1 for _ in csv.DictReader(handle)) + 2  # the header is row 1
    edit_csv(root / "caaxr" / "BoundingBox.csv", add_bad_boxes)
    damage["boxes"] = root / "caaxr" / "BoundingBox.csv"
    damage["bad_box_rows"] = (first_bad_row, first_bad_row + 1, first_bad_row + 2)
    damage["bad_box_width"] = width

    chexpert_csv = root / "chexpert" / "CheXpert-v1.0-small" / "train.csv"
    unknown_row = {}

    def unknown_label(fields, rows):
        for row in rows:
            if row["Frontal/Lateral"] == "Frontal" and not healthy[0]["path"].endswith(row["Path"]) and row["No Finding"] == "1.0":
                row["No Finding"] = "2"
                unknown_row["path"] = row["Path"]
                break
        return fields, rows

    edit_csv(chexpert_csv, unknown_label)
    damage["unknown_label"] = chexpert_csv
    return root, damage


def test_each_bad_input_is_reported_and_the_rest_is_written(damaged, tiny_data_root, tmp_path):
    root, damage = damaged
    summaries = build(root, tmp_path / "out")
    clean = build(tiny_data_root, tmp_path / "clean")

    skipped = summaries["2class"]["skipped"]
    text = "\n".join(f"{s['path']} | {s['field']} | {s['reason']}" for s in skipped)
    for kind in ("truncated", "corrupt", "empty", "missing_sidecar", "malformed_sidecar", "duplicate", "unknown_label"):
        assert any(s["path"] == str(damage[kind]) and s["field"] and s["reason"] for s in skipped), f"{kind} not reported:\n{text}"
    assert any("truncated" in s["reason"].lower() for s in skipped if s["path"] == str(damage["truncated"]))
    assert any("empty" in s["reason"].lower() or "0 bytes" in s["reason"] for s in skipped if s["path"] == str(damage["empty"]))

    # exactly the three injected box rows, each with its row number and the bad column
    seg_skipped = summaries["seg"]["skipped"]
    box_reports = {(s["path"], s["field"]): s["reason"] for s in seg_skipped if s["path"] == str(damage["boxes"])}
    too_wide, negative, empty = damage["bad_box_rows"]
    assert sorted(box_reports) == sorted([
        (str(damage["boxes"]), f"row {too_wide}: width"),
        (str(damage["boxes"]), f"row {negative}: x"),
        (str(damage["boxes"]), f"row {empty}: x"),
    ]), "\n".join(map(str, seg_skipped))
    assert "outside the image" in box_reports[(str(damage["boxes"]), f"row {too_wide}: width")]
    assert f"width {damage['bad_box_width']}" in box_reports[(str(damage["boxes"]), f"row {too_wide}: width")]
    assert box_reports[(str(damage["boxes"]), f"row {negative}: x")] == "negative (-4)"
    assert box_reports[(str(damage["boxes"]), f"row {empty}: x")] == "is empty"
    # a bad box drops the box, not the image: no other report names a box
    assert not [s for s in seg_skipped if s["path"] != str(damage["boxes"]) and "box" in s["field"].lower()]

    # the rest is written: exactly the damaged images are missing
    clean_2class = clean["2class"]["counts"]["total"]
    assert summaries["2class"]["counts"]["total"] == {
        "covid": clean_2class["covid"] - 4,  # truncated, corrupt, missing and malformed sidecar
        "non_covid": clean_2class["non_covid"] - 2,  # empty file, unknown label
    }
    assert summaries["seg"]["counts"]["total"]["lesion"] == clean["seg"]["counts"]["total"]["lesion"] - 2
    for name, summary in summaries.items():
        assert (tmp_path / "out" / name / "summary.json").exists()
        assert not list((tmp_path / "out" / name).rglob("*.tmp*"))


@pytest.mark.parametrize(
    "csv_name, column",
    [("caaxr/BoundingBox.csv", "width"), ("caaxr/Study-Level_Annotations.csv", "findings"),
     ("chexpert/CheXpert-v1.0-small/train.csv", "Pneumonia")],
)
def test_wrong_csv_schema_stops_before_writing(tiny_data_root, tmp_path, csv_name, column):
    root = tmp_path / "data"
    shutil.copytree(tiny_data_root, root)
    edit_csv(root / csv_name, lambda f, r: ([x for x in f if x != column], [{k: v for k, v in row.items() if k != column} for row in r]))
    out = tmp_path / "out"
    with pytest.raises(SchemaError) as error:
        build(root, out)
    assert csv_name.split("/")[-1] in str(error.value) and column in str(error.value)
    assert not out.exists()
