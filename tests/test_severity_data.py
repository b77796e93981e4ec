"""The covid-chestxray severity scores reader: hand-made files and the real collection."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from caaxr_tf.data.records import SchemaError
from caaxr_tf.data.sources.covid_chestxray_severity import (
    TARGET_NAMES,
    TARGET_RANGES,
    patient_groups,
    read_score_rows,
    read_severity_scores,
    severity_targets,
)

COMMENTS = [
    "## COVID-19 Pneumonia Severity Scores (Mean of 3 expert raters),,",
    "## License: CC BY-SA,,",
    "## Citation: Cohen et al.,,",
    "## geographic_extent_mean: 0 to 8.,,",
    "## opacity_mean: 0 to 6.,,",
]
METADATA_HEADER = ["patientid", "offset", "finding", "view", "modality", "folder", "filename"]


def write_collection(root, metadata_rows, score_lines, images):
    (root / "images").mkdir(parents=True)
    for name in images:
        (root / "images" / name).write_bytes(b"not decoded by the reader")
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(METADATA_HEADER)
        writer.writerows(metadata_rows)
    (root / "annotations").mkdir()
    path = root / "annotations" / "covid-severity-scores.csv"
    path.write_text("\n".join(score_lines) + "\n", encoding="utf-8")
    return path


def test_scores_are_joined_with_metadata_and_bad_rows_reported(tmp_path):
    scores_path = write_collection(
        tmp_path,
        [
            [10, 0, "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", "a.png"],  # metadata row 2
            [2, 0, "COVID-19", "AP", "X-ray", "images", "b.jpg"],  # 3
            [3, 0, "COVID-19", "L", "X-ray", "images", "lateral.png"],  # 4: not frontal
            [4, 0, "COVID-19", "PA", "X-ray", "images", "gone.png"],  # 5: no image file
            [5, 0, "COVID-19", "L", "X-ray", "images", "twice.png"],  # 6: lateral, then ...
            [6, 0, "COVID-19", "PA", "X-ray", "images", "twice.png"],  # 7: ... a usable row
            [7, 0, "COVID-19", "PA", "X-ray", "images", "c.png"],  # 8
            [8, 0, "COVID-19", "PA", "X-ray", "images", "d.png"],  # 9
            [9, 0, "COVID-19", "PA", "X-ray", "images", "e.png"],  # 10
            [11, 0, "COVID-19", "PA", "X-ray", "images", "f.png"],  # 11
            [12, 0, "COVID-19", "PA", "X-ray", "images", "g.png"],  # 12
        ],
        COMMENTS
        + [
            "filename,geographic_mean,opacity_mean",  # line 6
            "a.png,8.0,6.0",  # 7: both upper bounds
            "b.jpg, 0 ,0.0",  # 8: lower bounds, spaces
            "c.png,8.1,2",  # 9: geographic extent above 8
            "d.png,3,abc",  # 10: opacity not a number
            "e.png,3,-0.1",  # 11: opacity below 0
            "f.png,nan,2",  # 12: not finite
            "unknown.png,1,1",  # 13: no metadata row
            "gone.png,1,1",  # 14: no image
            "lateral.png,1,1",  # 15: not a frontal view
            "a.png,1,1",  # 16: repeated file name
            ",1,1",  # 17: empty file name
            "",  # 18: blank line, ignored
            "twice.png,2.7,1.3",  # 19: first metadata row unusable, second used
            "g.png,,1",  # 20: empty score
        ],
        images=["a.png", "b.jpg", "lateral.png", "twice.png", "c.png", "d.png", "e.png", "f.png", "g.png"],
    )

    result = read_severity_scores(tmp_path)

    assert [s.image_id for s in result.samples] == ["a.png", "b.jpg", "twice.png"]
    a, b, twice = result.samples
    assert (a.patient_id, a.source, a.view, a.findings) == ("10", "covid-chestxray", "pa", ("Pneumonia", "Viral", "COVID-19"))
    assert a.labels == {"geographic_extent": 8.0, "opacity": 6.0}
    assert a.path == str((tmp_path / "images" / "a.png").resolve())
    assert b.labels == {"geographic_extent": 0.0, "opacity": 0.0} and b.view == "ap"
    assert (twice.patient_id, twice.labels) == ("6", {"geographic_extent": 2.7, "opacity": 1.3})

    assert {s.path for s in result.skipped} == {str(scores_path.resolve())}
    reasons = {s.field: s.reason for s in result.skipped}
    assert list(reasons) == [
        "row 9: geographic_mean",
        "row 10: opacity_mean",
        "row 11: opacity_mean",
        "row 12: geographic_mean",
        "row 13: filename",
        "row 14: filename",
        "row 15: filename",
        "row 16: filename",
        "row 17: filename",
        "row 20: geographic_mean",
    ]
    assert reasons["row 9: geographic_mean"] == "8.1 is outside 0..8"
    assert reasons["row 10: opacity_mean"] == "not a number: 'abc'"
    assert reasons["row 11: opacity_mean"] == "-0.1 is outside 0..6"
    assert reasons["row 12: geographic_mean"] == "not a finite number: 'nan'"
    assert reasons["row 13: filename"] == "'unknown.png' has no row in metadata.csv"
    assert reasons["row 14: filename"] == "metadata.csv row 5: filename: image file not found: gone.png"
    assert reasons["row 15: filename"] == "metadata.csv row 4: view: non-frontal view"
    assert reasons["row 16: filename"] == "duplicate file name 'a.png' (first at row 7)"
    assert reasons["row 17: filename"] == "empty file name"
    assert reasons["row 20: geographic_mean"] == "not a number: ''"

    np.testing.assert_array_equal(severity_targets(result.samples), [[8.0, 6.0], [0.0, 0.0], [2.7, 1.3]])
    assert patient_groups(result.samples) == ["10", "2", "6"]


def test_score_file_without_the_expected_header_is_a_schema_error(tmp_path):
    path = write_collection(
        tmp_path,
        [[1, 0, "COVID-19", "PA", "X-ray", "images", "a.png"]],
        COMMENTS + ["filename,geographic_extent_mean,opacity_mean", "a.png,1,1"],
        images=["a.png"],
    )
    with pytest.raises(SchemaError) as caught:
        read_severity_scores(tmp_path)
    error = caught.value
    assert error.path == str(path.resolve()) and error.field == "geographic_mean"
    assert "['filename', 'geographic_extent_mean', 'opacity_mean']" in error.reason

    path.write_text("\n".join(COMMENTS) + "\n", encoding="utf-8")
    with pytest.raises(SchemaError, match="no header line"):
        read_score_rows(path)
    path.unlink()
    with pytest.raises(SchemaError, match="not found"):
        read_severity_scores(tmp_path)


def test_score_file_without_comments_and_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_bytes("\ufefffilename,opacity_mean,geographic_mean,extra\r\nx.png,1.5,2.5,z\r\n".encode("utf-8"))
    assert read_score_rows(path) == [
        (2, {"filename": "x.png", "opacity_mean": "1.5", "geographic_mean": "2.5", "extra": "z"})
    ]


def test_missing_metadata_column_is_a_schema_error(tmp_path):
    write_collection(tmp_path, [], COMMENTS + ["filename,geographic_mean,opacity_mean"], images=[])
    (tmp_path / "metadata.csv").write_text("patientid,filename\n1,a.png\n", encoding="utf-8")
    with pytest.raises(SchemaError) as caught:
        read_severity_scores(tmp_path)
    assert "metadata.csv" in caught.value.path and "finding" in caught.value.field


@pytest.mark.realdata
def test_real_collection_scores(covid_chestxray_root):
    result = read_severity_scores(covid_chestxray_root)

    raw = pd.read_csv(covid_chestxray_root / "annotations" / "covid-severity-scores.csv", skiprows=5)
    assert len(raw) == 94  # the published set
    assert len(result.samples) == 93  # one image is absent from the shared copy
    assert [(s.field, s.reason) for s in result.skipped] == [
        ("row 59: filename", "metadata.csv row 56: filename: image file not found: covid-19-pneumonia-14-PA.png")
    ]
    assert len(set(patient_groups(result.samples))) == 64
    assert {s.view for s in result.samples} == {"pa"}

    expected = raw.set_index("filename").loc[[s.image_id for s in result.samples]]
    targets = severity_targets(result.samples)
    np.testing.assert_array_equal(targets, expected[["geographic_mean", "opacity_mean"]].to_numpy())
    for column, name in enumerate(TARGET_NAMES):
        low, high = TARGET_RANGES[name]
        assert low <= targets[:, column].min() and targets[:, column].max() <= high
    metadata = pd.read_csv(covid_chestxray_root / "metadata.csv", dtype=str).drop_duplicates("filename")
    patients = metadata.set_index("filename").loc[[s.image_id for s in result.samples], "patientid"]
    assert patient_groups(result.samples) == patients.tolist()
