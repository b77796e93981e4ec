"""Source readers: BIMCV, CAAXR, CheXpert and covid-chestxray, on small hand-built trees."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from caaxr_tf.config import load_config
from caaxr_tf.data.bimcv import read_bimcv, read_sidecar, scan_bimcv
from caaxr_tf.data.records import Box, InputError, SchemaError, read_csv_table
from caaxr_tf.data.sources.caaxr import read_caaxr
from caaxr_tf.data.sources.chexpert import OBSERVATIONS, read_chexpert
from caaxr_tf.data.sources.covid_chestxray import read_covid_chestxray

# --------------------------------------------------------------------------- helpers


def write_png(path: Path, height: int = 8, width: int = 6, dtype=np.uint16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", np.zeros((height, width), dtype))
    assert ok
    path.write_bytes(data.tobytes())


def bimcv_image(
    root: Path, sub: str, ses: str, view: str | None, sidecar=None, modality: str = "dx"
) -> Path:
    """Write ``sub-X/ses-Y/mod-rx/<stem>.png`` and, unless ``sidecar`` is None, its sidecar.

    ``sidecar`` is a dict (written as JSON) or a str (written verbatim).
    """
    parts = [f"sub-{sub}", f"ses-{ses}", "run-1", "bp-chest"]
    if view is not None:
        parts.append(f"vp-{view}")
    stem = "_".join(parts + [modality])
    png = root / f"sub-{sub}" / f"ses-{ses}" / "mod-rx" / f"{stem}.png"
    # the PNG has the size its sidecar gives (the reader checks that they agree)
    rows = columns = None
    if isinstance(sidecar, dict):
        rows = (sidecar.get("00280010") or {}).get("Value", [None])[0]
        columns = (sidecar.get("00280011") or {}).get("Value", [None])[0]
    write_png(png, height=rows or 8, width=columns or 6)
    if sidecar is not None:
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        png.with_suffix(".json").write_text(text)
    return png


def dicom_json(**tags) -> dict:
    """DICOM-JSON sidecar: ``dicom_json(BitsStored=12, ...)`` with keywords mapped to tags."""
    codes = {
        "BitsStored": ("00280101", "US"),
        "PresentationLUTShape": ("20500020", "CS"),
        "ViewPosition": ("00185101", "CS"),
        "Rows": ("00280010", "US"),
        "Columns": ("00280011", "US"),
    }
    return {codes[k][0]: {"vr": codes[k][1], "Value": [v]} for k, v in tags.items()}


def write_csv(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))


def fields(result) -> set[tuple[str, str]]:
    """(file name, field) of every skipped input."""
    return {(Path(s.path).name, s.field) for s in result.skipped}


# --------------------------------------------------------------------------- BIMCV


def test_bimcv_reads_entities_sidecars_and_excludes_laterals(tmp_path):
    root = tmp_path / "bimcv" / "some" / "mirror"  # any folders may lie above sub-*
    inverse = bimcv_image(
        root, "S01", "E01", "pa", dicom_json(BitsStored=12, PresentationLUTShape="INVERSE", Rows=8, Columns=6)
    )
    plain = bimcv_image(root, "S01", "E02", "ap", {"20500020": "IDENTITY", "00280101": 16}, modality="cr")
    no_vp = bimcv_image(root, "S02", "E03", None, dicom_json(ViewPosition="PA"))
    bimcv_image(root, "S02", "E04", "ll")  # lateral, no sidecar: excluded, not skipped
    bimcv_image(root, "S03", "E05", None, dicom_json(ViewPosition="LL", BitsStored=12))

    result = read_bimcv(tmp_path / "bimcv")

    assert result.skipped == []
    assert result.excluded == {"non-frontal view": 2}
    by_id = {s.image_id: s for s in result.samples}
    assert [s.image_id for s in result.samples] == [inverse.stem, plain.stem, no_vp.stem]
    a, b, c = (by_id[p.stem] for p in (inverse, plain, no_vp))
    assert (a.patient_id, a.study_id, a.view, a.invert, a.bit_depth) == ("sub-S01", "ses-E01", "pa", True, 12)
    assert (b.patient_id, b.study_id, b.view, b.invert, b.bit_depth) == ("sub-S01", "ses-E02", "ap", False, 16)
    assert (c.patient_id, c.study_id, c.view, c.invert, c.bit_depth) == ("sub-S02", "ses-E03", "pa", False, None)
    assert all(s.labels == {"COVID-19": 1.0} and s.source == "bimcv" for s in result.samples)
    assert a.path == str(inverse.resolve())
    assert scan_bimcv(tmp_path / "bimcv").sizes == {inverse.stem: (8, 6)}


def test_bimcv_reports_bad_sidecars_with_file_and_tag(tmp_path):
    root = tmp_path / "bimcv"
    good = bimcv_image(root, "S01", "E01", "pa", dicom_json(BitsStored=12))
    missing = bimcv_image(root, "S02", "E02", "pa", None)
    malformed = bimcv_image(root, "S03", "E03", "ap", '{"00280101": {"vr": "US", "Value": [12]')
    bits = bimcv_image(root, "S04", "E04", "pa", dicom_json(BitsStored="abc"))
    shape = bimcv_image(root, "S05", "E05", "pa", {"20500020": "SIDEWAYS"})
    too_deep = bimcv_image(root, "S06", "E06", "pa", dicom_json(BitsStored=20))
    not_object = bimcv_image(root, "S07", "E07", "pa", "[12]")

    result = read_bimcv(root)

    assert [s.image_id for s in result.samples] == [good.stem]
    assert fields(result) == {
        (missing.with_suffix(".json").name, "file"),
        (malformed.with_suffix(".json").name, "json"),
        (bits.with_suffix(".json").name, "00280101 (BitsStored)"),
        (shape.with_suffix(".json").name, "20500020 (PresentationLUTShape)"),
        (too_deep.with_suffix(".json").name, "00280101 (BitsStored)"),
        (not_object.with_suffix(".json").name, "json"),
    }
    reasons = {Path(s.path).stem: s.reason for s in result.skipped}
    assert "'abc'" in reasons[bits.stem]
    assert "SIDEWAYS" in reasons[shape.stem]


def test_bimcv_missing_sidecar_allowed_when_not_required(tmp_path):
    png = bimcv_image(tmp_path, "S01", "E01", "pa", None)
    result = read_bimcv(tmp_path, {"require_sidecar": False})
    assert result.skipped == []
    assert [(s.image_id, s.invert, s.bit_depth) for s in result.samples] == [(png.stem, False, None)]


def test_bimcv_image_without_any_view_is_skipped(tmp_path):
    png = bimcv_image(tmp_path, "S01", "E01", None, dicom_json(BitsStored=12))
    result = read_bimcv(tmp_path)
    assert result.samples == []
    assert fields(result) == {(png.name, "vp")}


def test_bimcv_duplicate_image_ids_are_reported(tmp_path):
    first = bimcv_image(tmp_path / "a", "S01", "E01", "pa", dicom_json(BitsStored=12))
    second = bimcv_image(tmp_path / "b", "S01", "E01", "pa", dicom_json(BitsStored=12))
    result = read_bimcv(tmp_path)
    assert [s.path for s in result.samples] == [str(first.resolve())]
    assert [(s.path, s.field) for s in result.skipped] == [(str(second.resolve()), "image_id")]


def test_read_sidecar_plain_and_dicom_json_forms(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"20500020": "inverse", "00280101": "12", "00280010": 30, "00280011": 20}))
    sidecar = read_sidecar(plain)
    assert (sidecar.invert, sidecar.bit_depth, sidecar.size) == (True, 12, (30, 20))
    empty_value = tmp_path / "empty.json"
    empty_value.write_text(
        json.dumps({"00280101": {"vr": "US"}, "20500020": {"vr": "CS", "Value": ["IDENTITY"]}})
    )
    assert read_sidecar(empty_value).bit_depth is None
    bad_rows = tmp_path / "rows.json"
    bad_rows.write_text(json.dumps({"00280010": -3}))
    with pytest.raises(InputError) as caught:
        read_sidecar(bad_rows)
    assert (caught.value.path, caught.value.field) == (str(bad_rows), "00280010 (Rows)")


# --------------------------------------------------------------------------- CAAXR

BOX_HEADER = ["image_id", "finding", "x", "y", "width", "height"]
STUDY_HEADER = ["image_id", "findings"]


def caaxr_tree(data_root: Path) -> dict[str, str]:
    """Four BIMCV images (three frontal, sizes 100 x 80 from the sidecar, except ``c``)."""
    bimcv = data_root / "bimcv"
    sized = dict(BitsStored=12, Rows=100, Columns=80)
    return {
        "a": bimcv_image(bimcv, "S01", "E01", "pa", dicom_json(PresentationLUTShape="INVERSE", **sized)).stem,
        "b": bimcv_image(bimcv, "S02", "E02", "ap", dicom_json(**sized)).stem,
        "c": bimcv_image(bimcv, "S03", "E03", "pa", dicom_json(BitsStored=16)).stem,
        "lat": bimcv_image(bimcv, "S01", "E01", "ll", dicom_json(**sized)).stem,
    }


def test_caaxr_joins_study_level_findings_and_boxes(tmp_path):
    ids = caaxr_tree(tmp_path)
    write_csv(
        tmp_path / "caaxr" / "Study-Level_Annotations.csv",
        STUDY_HEADER,
        [[ids["a"], "Consolidation; Ground glass opacity ;Consolidation"], [ids["b"] + ".png", "No finding"]],
    )
    write_csv(
        tmp_path / "caaxr" / "BoundingBox.csv",
        BOX_HEADER,
        [
            [ids["a"], "Consolidation", 10, 20, 30, 40],
            [ids["a"] + ".png", "Ground glass opacity", 0, 0, 80, 100.5],  # 0.5 px overrun: clipped
        ],
    )

    result = read_caaxr(tmp_path)

    assert result.skipped == []
    assert result.excluded == {"non-frontal view": 1, "not in CAAXR study-level annotations": 1}
    by_id = {s.image_id: s for s in result.samples}
    assert sorted(by_id) == sorted([ids["a"], ids["b"]])
    a, b = by_id[ids["a"]], by_id[ids["b"]]
    assert a.findings == ("Consolidation", "Ground glass opacity")
    assert a.boxes == (
        Box(10.0, 20.0, 40.0, 60.0, "Consolidation"),
        Box(0.0, 0.0, 80.0, 100.0, "Ground glass opacity"),
    )
    assert (a.invert, a.bit_depth, a.patient_id, a.study_id, a.labels) == (
        True, 12, "sub-S01", "ses-E01", {"COVID-19": 1.0}
    )
    assert (b.findings, b.boxes, b.invert) == ((), (), False)


def test_caaxr_xyxy_boxes_from_config(tmp_path):
    ids = caaxr_tree(tmp_path)
    write_csv(tmp_path / "caaxr" / "Study-Level_Annotations.csv", STUDY_HEADER, [[ids["a"], "Nodule"]])
    write_csv(
        tmp_path / "caaxr" / "BoundingBox.csv",
        ["image_id", "finding", "x", "y", "x2", "y2"],
        [[ids["a"], "Nodule", 5, 6, 15, 26], [ids["a"], "Nodule", 5, 6, 5, 26]],
    )
    config = {"caaxr": {"box_format": "xyxy", "box_columns": {"x_max": "x2", "y_max": "y2"}}}

    result = read_caaxr(tmp_path, config)

    assert result.samples[0].boxes == (Box(5.0, 6.0, 15.0, 26.0, "Nodule"),)
    assert fields(result) == {("BoundingBox.csv", "row 3: x2")}


@pytest.mark.parametrize(
    "file_name, header, missing",
    [
        ("BoundingBox.csv", ["image_id", "finding", "x", "y", "height"], "width"),
        ("Study-Level_Annotations.csv", ["image_id", "labels"], "findings"),
    ],
)
def test_caaxr_missing_column_raises_schema_error(tmp_path, file_name, header, missing):
    caaxr_tree(tmp_path)
    write_csv(tmp_path / "caaxr" / "BoundingBox.csv", BOX_HEADER, [])
    write_csv(tmp_path / "caaxr" / "Study-Level_Annotations.csv", STUDY_HEADER, [])
    write_csv(tmp_path / "caaxr" / file_name, header, [["x"] * len(header)])

    with pytest.raises(SchemaError) as caught:
        read_caaxr(tmp_path)

    assert caught.value.path == str((tmp_path / "caaxr" / file_name).resolve())
    assert caught.value.field == missing
    assert file_name in str(caught.value) and missing in str(caught.value)


def test_caaxr_missing_csv_raises_schema_error(tmp_path):
    caaxr_tree(tmp_path)
    write_csv(tmp_path / "caaxr" / "Study-Level_Annotations.csv", STUDY_HEADER, [])
    with pytest.raises(SchemaError, match="BoundingBox.csv: file: not found"):
        read_caaxr(tmp_path)


def test_caaxr_bad_rows_are_reported_and_good_rows_survive(tmp_path):
    ids = caaxr_tree(tmp_path)
    a, b, c = ids["a"], ids["b"], ids["c"]
    no_sidecar = bimcv_image(tmp_path / "bimcv", "S04", "E04", "pa", None)
    write_csv(
        tmp_path / "caaxr" / "Study-Level_Annotations.csv",
        STUDY_HEADER,
        [
            [a, "Consolidation"],  # row 2
            [b, "Nodule"],  # row 3
            [a, "Nodule"],  # row 4: duplicate
            ["sub-S09_ses-E09_run-1_bp-chest_vp-pa_dx", "Nodule"],  # row 5: not in BIMCV
            [ids["lat"], "Nodule"],  # row 6: in the tree but lateral
            [c, "Nodule"],  # row 7: no size in the sidecar
            [no_sidecar.stem, "Nodule"],  # row 8: image skipped (already reported)
        ],
    )
    write_csv(
        tmp_path / "caaxr" / "BoundingBox.csv",
        BOX_HEADER,
        [
            [a, "Consolidation", 10, 10, 20, 20],  # row 2: good
            [a, "Consolidation", "", 10, 20, 20],  # row 3: null x
            [a, "Consolidation", 10, "NaN", 20, 20],  # row 4: NaN y
            [a, "Consolidation", 10, 10, "abc", 20],  # row 5: non-numeric width
            [a, "Consolidation", -1, 10, 20, 20],  # row 6: negative x
            [a, "Consolidation", 10, 10, 20, 0],  # row 7: zero height
            [a, "Consolidation", 70, 10, 20, 20],  # row 8: ends at 90 > width 80
            [a, "Consolidation", 10, 120, 5, 5],  # row 9: starts below the image
            ["sub-S08_ses-E08_run-1_bp-chest_vp-pa_dx", "Nodule", 1, 1, 2, 2],  # row 10
            [b, "Nodule", 1, 2, 3, 4],  # row 11: good
            [c, "Nodule", 500, 500, 100, 100],  # row 12: size unknown, kept
            # Rows 13-15: images whose problem is already reported are not reported again.
            ["sub-S09_ses-E09_run-1_bp-chest_vp-pa_dx", "Nodule", 1, 1, 2, 2],
            [ids["lat"], "Nodule", 1, 1, 2, 2],
            [no_sidecar.stem, "Nodule", 1, 1, 2, 2],
        ],
    )

    result = read_caaxr(tmp_path)

    assert fields(result) == {
        (no_sidecar.with_suffix(".json").name, "file"),
        ("Study-Level_Annotations.csv", "row 4: image_id"),
        ("Study-Level_Annotations.csv", "row 5: image_id"),
        ("Study-Level_Annotations.csv", "row 6: image_id"),
        ("BoundingBox.csv", "row 3: x"),
        ("BoundingBox.csv", "row 4: y"),
        ("BoundingBox.csv", "row 5: width"),
        ("BoundingBox.csv", "row 6: x"),
        ("BoundingBox.csv", "row 7: height"),
        ("BoundingBox.csv", "row 8: width"),
        ("BoundingBox.csv", "row 9: y"),
        ("BoundingBox.csv", "row 10: image_id"),
    }
    reasons = {s.field: s.reason for s in result.skipped if s.path.endswith("BoundingBox.csv")}
    assert reasons["row 3: x"] == "is empty"
    assert reasons["row 4: y"] == "is NaN"
    assert "'abc'" in reasons["row 5: width"]
    assert "negative" in reasons["row 6: x"]
    assert "outside the image (width 80)" in reasons["row 8: width"]
    assert "not found in the BIMCV tree" in reasons["row 10: image_id"]
    assert len(result.skipped) == 12  # one report per problem
    study = {s.field: s.reason for s in result.skipped if s.path.endswith("Annotations.csv")}
    assert "duplicate study-level row" in study["row 4: image_id"]
    assert "not found in the BIMCV tree" in study["row 5: image_id"]
    assert "non-frontal view" in study["row 6: image_id"]
    by_id = {s.image_id: s for s in result.samples}
    assert sorted(by_id) == sorted([a, b, c])  # bad boxes never drop their image
    assert by_id[a].boxes == (Box(10.0, 10.0, 30.0, 30.0, "Consolidation"),)
    assert by_id[a].findings == ("Consolidation",)  # the first study-level row wins
    assert by_id[b].boxes == (Box(1.0, 2.0, 4.0, 6.0, "Nodule"),)
    assert by_id[c].boxes == (Box(500.0, 500.0, 600.0, 600.0, "Nodule"),)


def test_caaxr_box_for_unlisted_image_is_reported(tmp_path):
    ids = caaxr_tree(tmp_path)
    write_csv(tmp_path / "caaxr" / "Study-Level_Annotations.csv", STUDY_HEADER, [[ids["a"], "Nodule"]])
    write_csv(tmp_path / "caaxr" / "BoundingBox.csv", BOX_HEADER, [[ids["b"], "Nodule", 1, 1, 2, 2]])
    result = read_caaxr(tmp_path)
    assert [s.image_id for s in result.samples] == [ids["a"]]
    assert fields(result) == {("BoundingBox.csv", "row 2: image_id")}
    assert "not listed in Study-Level_Annotations.csv" in result.skipped[0].reason
    assert result.excluded["not in CAAXR study-level annotations"] == 2


# --------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]


def chexpert_row(path: str, kind: str = "Frontal", view: str = "AP", **labels) -> list:
    values = {name: "" for name in OBSERVATIONS}
    values.update({k.replace("_", " "): v for k, v in labels.items()})
    return [path, "Female", 60, kind, view, *(values[name] for name in OBSERVATIONS)]


def chexpert_tree(root: Path, train_rows: list[list], valid_rows: list[list] | None = None) -> None:
    base = root / "CheXpert-v1.0-small"
    for name, rows in (("train.csv", train_rows), ("valid.csv", valid_rows or [])):
        write_csv(base / name, CHEXPERT_HEADER, rows)
        for row in rows:
            if not row[0].endswith("missing.jpg"):
                write_png(root / row[0], dtype=np.uint8)


@pytest.mark.parametrize("policy, uncertain_value", [("exclude", -1.0), ("positive", 1.0), ("negative", 0.0)])
def test_chexpert_labels_views_and_uncertain_policy(tmp_path, policy, uncertain_value):
    chexpert_tree(
        tmp_path,
        [
            chexpert_row(
                "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                view="PA", Cardiomegaly="1.0", Edema="0.0", Pneumonia="-1.0",
            ),
            chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Lateral", ""),
        ],
        [chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", No_Finding="1")],
    )

    result = read_chexpert(tmp_path, {"uncertain": policy})

    assert result.skipped == []
    assert result.excluded == {"non-frontal view": 1}
    first, second = result.samples
    assert (first.image_id, first.patient_id, first.study_id, first.view) == (
        "train/patient00001/study1/view1_frontal", "patient00001", "study1", "pa"
    )
    first_file = tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert first.path == str(first_file.resolve())
    expected = {name: 0.0 for name in OBSERVATIONS}
    expected.update({"Cardiomegaly": 1.0, "Pneumonia": uncertain_value})
    assert first.labels == expected
    assert (second.image_id, second.patient_id, second.view) == (
        "valid/patient64541/study1/view1_frontal", "patient64541", "ap"
    )
    assert second.labels == {name: (1.0 if name == "No Finding" else 0.0) for name in OBSERVATIONS}


def test_chexpert_bad_rows_are_reported(tmp_path):
    base = "CheXpert-v1.0-small/train/patient0000{}/study1/view1_frontal.jpg"
    chexpert_tree(
        tmp_path,
        [
            chexpert_row(base.format(1), Edema="1.0"),  # row 2: good
            chexpert_row(base.format(2), Edema="2"),  # row 3: unknown value
            chexpert_row(base.format(3), Fracture="yes"),  # row 4: unknown value
            chexpert_row("CheXpert-v1.0-small/train/patient00004/study1/missing.jpg"),  # row 5
            chexpert_row(base.format(1), Edema="0.0"),  # row 6: duplicate path
            chexpert_row(base.format(5), "Sideways"),  # row 7: bad Frontal/Lateral
        ],
    )
    result = read_chexpert(tmp_path)
    assert [s.patient_id for s in result.samples] == ["patient00001"]
    assert result.samples[0].labels["Edema"] == 1.0
    assert fields(result) == {
        ("train.csv", "row 3: Edema"),
        ("train.csv", "row 4: Fracture"),
        ("train.csv", "row 5: Path"),
        ("view1_frontal.jpg", "image_id"),
        ("train.csv", "row 7: Frontal/Lateral"),
    }
    reasons = {s.field: s.reason for s in result.skipped}
    assert "'yes'" in reasons["row 4: Fracture"]
    assert "missing.jpg" in reasons["row 5: Path"]


def test_chexpert_missing_observation_column_raises(tmp_path):
    header = [name for name in CHEXPERT_HEADER if name != "Pleural Other"]
    write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", header, [])
    write_csv(tmp_path / "CheXpert-v1.0-small" / "valid.csv", CHEXPERT_HEADER, [])
    with pytest.raises(SchemaError) as caught:
        read_chexpert(tmp_path)
    assert caught.value.path.endswith("train.csv") and caught.value.field == "Pleural Other"


def test_chexpert_unknown_uncertain_policy_is_a_config_error(tmp_path):
    chexpert_tree(tmp_path, [])
    with pytest.raises(ValueError, match="chexpert.uncertain"):
        read_chexpert(tmp_path, {"uncertain": "maybe"})


# --------------------------------------------------------------------------- covid-chestxray

COVID_HEADER = ["patientid", "offset", "sex", "age", "finding", "view", "modality", "folder", "filename", "notes"]


def test_covid_chestxray_rows_boxes_and_bad_input(tmp_path):
    images = tmp_path / "images"
    for name in ("a.png", "b.jpg", "c.png", "d.png", "lat.png"):
        write_png(images / name, height=100, width=80, dtype=np.uint8)
    write_csv(
        tmp_path / "metadata.csv",
        COVID_HEADER,
        [
            [1, 0, "M", 50, "COVID-19", "PA", "X-ray", "images", "a.png", "caf\u00e9"],  # row 2
            [1, 3, "M", 50, '"COVID-19, ARDS"', "AP Supine", "X-ray", "images", "b.jpg", ""],  # row 3
            [2, 0, "F", 40, "Pneumonia/Viral/SARS", "AP", "X-ray", "images", "c.png", ""],  # row 4
            [3, 0, "F", 30, "No Finding", "L", "X-ray", "images", "lat.png", ""],  # row 5: lateral
            [4, 0, "F", 30, "COVID-19", "Axial", "CT", "volumes", "ct.nii.gz", ""],  # row 6: CT
            [5, 0, "M", 70, "COVID-19", "PA", "X-ray", "images", "gone.png", ""],  # row 7: absent
            [6, 0, "M", 70, "No Finding", "PA", "X-ray", "images", "a.png", ""],  # row 8: duplicate
            [7, 0, "M", 70, "No Finding", "AP", "X-ray", "images", "d.png", ""],  # row 9
        ],
        encoding="latin-1",  # not valid UTF-8: the reader falls back
    )
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 100, "width": 80},
            {"id": 2, "file_name": "c.png", "height": 100, "width": 80},
            {"id": 3, "file_name": "d.png", "height": 200, "width": 160},  # not the file's size
        ],
        "categories": [{"id": 1, "name": "Right Lung"}, {"id": 2, "name": "Left Lung"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 6, 30, 80]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [None, None, None, None]},
            {"id": 12, "image_id": 2, "category_id": 2, "bbox": [40, -2, 30, 80]},
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": [10, 10, 100, 50]},
            {"id": 14, "image_id": 2, "category_id": 2, "bbox": [40, 10, 30, 80.4]},
            {"id": 15, "image_id": 9, "category_id": 1, "bbox": [1, 1, 2, 2]},
            {"id": 16, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2]},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "lung_bounding_boxes.json").write_text(json.dumps(coco))

    result = read_covid_chestxray(tmp_path)

    assert result.excluded == {"non-frontal view": 1, "modality not X-ray": 1}
    assert fields(result) == {
        ("metadata.csv", "row 7: filename"),
        ("metadata.csv", "row 8: filename"),
        ("lung_bounding_boxes.json", "annotation 11: bbox"),
        ("lung_bounding_boxes.json", "annotation 12: bbox"),
        ("lung_bounding_boxes.json", "annotation 13: bbox"),
        ("lung_bounding_boxes.json", "annotation 15: image_id"),
        ("lung_bounding_boxes.json", "image 3: width/height"),
    }
    reasons = {s.field: s.reason for s in result.skipped}
    assert "gone.png" in reasons["row 7: filename"]
    assert reasons["annotation 11: bbox"] == "x: is null"
    by_id = {s.image_id: s for s in result.samples}
    assert list(by_id) == ["a.png", "b.jpg", "c.png", "d.png"]
    a, b, c, d = by_id.values()
    assert (a.patient_id, a.view, a.findings, a.labels) == ("1", "pa", ("COVID-19",), {"COVID-19": 1.0})
    assert a.boxes == (Box(5.0, 6.0, 35.0, 86.0, "Right Lung"),)
    assert (b.view, b.findings, b.labels) == ("ap supine", ("COVID-19", "ARDS"), {"COVID-19": 1.0})
    assert (c.findings, c.labels) == (("Pneumonia", "Viral", "SARS"), {"COVID-19": 0.0})
    assert c.boxes == (Box(40.0, 10.0, 70.0, 90.4, "Left Lung"),)
    assert (d.findings, d.boxes) == (("No Finding",), ())
    assert all(s.source == "covid-chestxray" for s in result.samples)


def test_covid_chestxray_missing_column_raises(tmp_path):
    write_csv(tmp_path / "metadata.csv", [h for h in COVID_HEADER if h != "modality"], [])
    with pytest.raises(SchemaError) as caught:
        read_covid_chestxray(tmp_path)
    assert caught.value.field == "modality" and "metadata.csv" in str(caught.value)


@pytest.mark.realdata
def test_covid_chestxray_real_collection_counts(covid_chestxray_root):
    config = load_config("data")["covid_chestxray"]
    result = read_covid_chestxray(covid_chestxray_root, config)

    duplicates = [s for s in result.skipped if "duplicate file name" in s.reason]
    # README: 531 frontal X-ray rows with an image present; 4 of them repeat a file name.
    assert len(result.samples) + len(duplicates) == 531
    assert len(result.samples) == 527
    findings = Counter(", ".join(s.findings) for s in result.samples)
    assert findings["COVID-19"] == 415 and findings["COVID-19, ARDS"] == 12
    assert findings["No Finding"] == 19
    assert sum(s.labels["COVID-19"] for s in result.samples) == 427
    assert result.excluded == {"non-frontal view": 47, "modality not X-ray": 84}
    absent = [s for s in result.skipped if "image file not found" in s.reason]
    assert len(absent) == 11
    # The README's two broken boxes (null coordinates) are reported, nothing is lost silently.
    null_boxes = [s for s in result.skipped if s.field.startswith("annotation ")]
    assert [(s.field, s.reason) for s in null_boxes] == [
        ("annotation 317: bbox", "x: is null"),
        ("annotation 318: bbox", "x: is null"),
    ]
    with_boxes = [s for s in result.samples if s.boxes]
    assert all({b.finding for b in s.boxes} <= {"Right Lung", "Left Lung"} for s in with_boxes)
    assert len(with_boxes) == 152


# --------------------------------------------------------------------------- synthetic set


def test_readers_match_the_synthetic_manifest(tiny_data_root):
    """The generator and the readers agree on the layout in docs/data_layouts.md."""
    counts = json.loads((tiny_data_root / "synthetic.json").read_text())["counts"]
    config = load_config("data")

    caaxr = read_caaxr(tiny_data_root, config)
    assert caaxr.skipped == []
    assert sum(1 for s in caaxr.samples if s.boxes) == counts["covid_boxes"]
    assert sum(1 for s in caaxr.samples if not s.boxes) == counts["covid_no_boxes"]
    assert caaxr.excluded == {
        "non-frontal view": counts["bimcv_lateral"],
        "not in CAAXR study-level annotations": counts["bimcv_unlisted"],
    }

    chexpert = read_chexpert(tiny_data_root / "chexpert", config["chexpert"])
    frontal = sum(v for k, v in counts.items() if k.startswith("chexpert_") and k != "chexpert_lateral")
    assert chexpert.skipped == []
    assert len(chexpert.samples) == frontal
    assert chexpert.excluded == {"non-frontal view": counts["chexpert_lateral"]}


def test_read_csv_table_encodings_and_header(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeff image_id ,findings\nA,caf\u00e9\n,\n".encode("utf-8"))
    table = read_csv_table(path, ["image_id", "findings"])
    assert list(table.columns) == ["image_id", "findings"]
    assert table.values.tolist() == [["A", "caf\u00e9"], ["", ""]]
    path.write_bytes("image_id,findings\nA,caf\u00e9\n".encode("latin-1"))
    assert read_csv_table(path, ["image_id"])["findings"].tolist() == ["caf\u00e9"]
    with pytest.raises(SchemaError) as caught:
        read_csv_table(path, ["image_id", "x", "y"])
    assert (caught.value.path, caught.value.field) == (str(path), "x, y")
    path.write_bytes(b"")
    with pytest.raises(SchemaError, match="cannot be read as CSV"):
        read_csv_table(path)


def test_bimcv_sidecar_demographics_reach_the_manifest(tmp_path):
    """Issue 23 item 4: PatientSex, PatientAge, Modality and Manufacturer of the sidecar are carried
    into Sample.demographics (manifest columns for --slice-by), leniently: they are only metadata."""
    from caaxr_tf.data.bimcv import dicom_age_years, read_bimcv

    tags = {**dicom_json(BitsStored=12, ViewPosition="PA"),
            "00100040": {"vr": "CS", "Value": ["f"]}, "00101010": {"vr": "AS", "Value": ["045Y"]},
            "00080060": {"vr": "CS", "Value": ["CR"]}, "00080070": {"vr": "LO", "Value": ["Philips"]}}
    bimcv_image(tmp_path, "S1", "E1", "pa", tags)
    bimcv_image(tmp_path, "S2", "E1", "pa", {**dicom_json(BitsStored=12), "00101010": {"vr": "AS", "Value": ["4 5Y"]},
                                             "00100040": {"vr": "CS", "Value": ["M", "F"]}})
    samples = {s.patient_id: s for s in read_bimcv(tmp_path).samples}
    assert samples["sub-S1"].demographics == {"sex": "F", "age": "45", "modality": "CR", "manufacturer": "Philips"}
    assert samples["sub-S2"].demographics == {}, "an unreadable age or two sexes leave the fields empty, not the image"
    assert [dicom_age_years(v) for v in ("045Y", "018M", "006W", "364D", "365D", "45Y", "")] == [
        "45", "1", "0", "0", "0", "", ""]
