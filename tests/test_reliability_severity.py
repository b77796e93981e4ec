"""Issue 27: the severity defects (scores reader, protocol and run_features commands, splits,
the build's --folds), each reported as a clear error or fixed, on hand-made tiny collections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from caaxr_tf.data.records import SchemaError
from caaxr_tf.data.sources.covid_chestxray_severity import read_score_rows
from test_severity_data import write_collection

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- #
# 1. a scores file that holds one blank line
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("content", [b"\n", b"\r\n", b"## comment,,\n\n", b"\n\r\n  \n"])
def test_blank_scores_file_is_a_schema_error_naming_the_file(tmp_path, content):
    path = tmp_path / "scores.csv"
    path.write_bytes(content)
    with pytest.raises(SchemaError) as caught:
        read_score_rows(path)
    assert caught.value.path == str(path) and caught.value.field == "header"
    assert "no header line" in caught.value.reason and "filename" in caught.value.reason


def test_blank_lines_before_the_header_are_skipped_and_counted(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_bytes(b"## c,,\r\n\r\nfilename,geographic_mean,opacity_mean\r\nx.png,1,2\r\n")
    assert read_score_rows(path) == [(4, {"filename": "x.png", "geographic_mean": "1", "opacity_mean": "2"})]


def test_blank_scores_file_in_the_protocol_command_and_the_build(tmp_path, capsys):
    from caaxr_tf.data.tfrecords import main as build_main
    from caaxr_tf.severity.protocol import main

    scores = write_collection(tmp_path / "data", [[1, 0, "COVID-19", "PA", "X-ray", "images", "a.png"]], [],
                              images=["a.png"])
    scores.write_bytes(b"\r\n")
    capsys.readouterr()
    assert main(["--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "covid-severity-scores.csv: header: no header line" in err
    assert build_main(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                       "--source", "covid-chestxray", "--protocol", "severity", "--workers", "1",
                       "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "covid-severity-scores.csv: header: no header line" in err


# --------------------------------------------------------------------------- #
# the score range message prints the value as read, not rounded to 6 digits
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("text, reason", [
    ("8.0000001", "8.0000001 is outside 0..8"),
    ("-0.0000001", "-1e-07 is outside 0..8"),
    ("8.1", "8.1 is outside 0..8"),
    ("9", "9 is outside 0..8"),
    ("8", None),
])
def test_score_outside_its_range_prints_enough_digits(text, reason):
    from caaxr_tf.data.sources.covid_chestxray_severity import TARGETS, _parse_score

    value, problem = _parse_score(text, TARGETS[0])
    assert (problem or None) == reason
    assert (value is None) == (reason is not None)
