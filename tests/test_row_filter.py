"""The covid-chestxray row filter: a hand-made metadata.csv and the real collection's partitions."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from caaxr_tf.data.records import SchemaError
from caaxr_tf.data.row_filter import RowFilter
from caaxr_tf.data.sources.covid_chestxray import read_covid_chestxray

HEADER = ["patientid", "finding", "view", "modality", "filename", "location", "url"]
ROWS = [
    # patient, finding, view, modality, file, location, url
    ["1", "COVID-19", "PA", "X-ray", "a.png", "Milan, Italy", "https://www.sirm.org/case-1"],
    ["2", "Pneumonia/Bacterial", "AP", "X-ray", "b.png", "Valencia, Spain", "https://www.eurorad.org/case/1"],
    ["3", "COVID-19", "AP Supine", "X-ray", "c.png", "", "https://www.EURORAD.org/case/2"],
    ["4", "No Finding", "PA", "X-ray", "d.png", "Toronto, Canada", "https://radiopaedia.org/cases/x"],
    ["5", "COVID-19", "L", "X-ray", "e.png", "Milan, Italy", "https://www.sirm.org/case-2"],  # lateral
    ["6", "COVID-19", "PA", "X-ray", "f.png", "Rome, Italy", "https://www.eurorad.org/case/3"],
]
CONFIG = {"lung_boxes": None}


@pytest.fixture
def collection(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    for row in ROWS:
        cv2.imwrite(str(tmp_path / "images" / row[4]), np.full((8, 8), 90, np.uint8))
    pd.DataFrame(ROWS, columns=HEADER).to_csv(tmp_path / "metadata.csv", index=False)
    return tmp_path


def read(root: Path, row_filter) -> tuple[list[str], dict[str, int]]:
    result = read_covid_chestxray(root, {**CONFIG, "row_filter": row_filter})
    assert result.skipped == []
    return [s.image_id for s in result.samples], result.excluded


def test_no_filter_keeps_every_frontal_row(collection):
    ids, excluded = read(collection, None)
    assert ids == ["a.png", "b.png", "c.png", "d.png", "f.png"]
    assert excluded == {"non-frontal view": 1}
    assert read(collection, {"include": {}, "exclude": {}, "match": "substring"}) == (ids, excluded)


def test_include_exclude_and_exact(collection):
    ids, excluded = read(collection, {"include": {"url": ["eurorad.org"]}})
    assert ids == ["b.png", "c.png", "f.png"]  # case-insensitive: EURORAD.org
    assert excluded == {
        "non-frontal view": 1,
        "covid_chestxray.row_filter: url matches no include value ['eurorad.org']": 2,
    }
    ids, excluded = read(collection, {"include": {"url": ["EUROrad.org"]}, "exclude": {"location": ["italy"]}})
    assert ids == ["b.png", "c.png"]
    assert excluded["covid_chestxray.row_filter: location matches an exclude value ['italy']"] == 1
    # Every include column must match (AND), any value of a column may (OR).
    ids, _ = read(collection, {"include": {"url": ["eurorad", "radiopaedia"], "location": ["spain", "canada"]}})
    assert ids == ["b.png", "d.png"]
    # exact: whole cells; an empty value selects empty cells.
    assert read(collection, {"include": {"location": [""]}, "match": "exact"})[0] == ["c.png"]
    assert read(collection, {"include": {"location": ["italy"]}, "match": "exact"})[0] == []
    assert read(collection, {"include": {"location": ["rome, ITALY "]}, "match": "exact"})[0] == ["f.png"]


def test_unknown_column_stops_the_read(collection):
    with pytest.raises(SchemaError) as caught:
        read_covid_chestxray(collection, {**CONFIG, "row_filter": {"exclude": {"hospital": ["x"]}}})
    error = caught.value
    assert error.path.endswith("metadata.csv")
    assert error.field == "covid_chestxray.row_filter.exclude.hospital"
    assert "unknown column(s) ['hospital']" in error.reason and "'location', 'url'" in error.reason


@pytest.mark.parametrize(
    "config, message",
    [
        ({"includes": {}}, r"unknown key\(s\) \['includes'\]"),
        ({"include": {"url": "eurorad"}}, r"row_filter.include.url: expected a non-empty list.*\['eurorad'\]"),
        ({"include": {"url": []}}, "non-empty list"),
        ({"include": {"url": [" "]}}, "empty substring matches every row"),
        ({"exclude": ["url"]}, r"row_filter.exclude: expected \{column: \[values\]\}"),
        ({"match": "regex"}, "row_filter.match: expected one of"),
        ({"include": {"url": [None]}}, "values must be strings"),
        ("url=eurorad", "expected a mapping"),
    ],
)
def test_malformed_filters_are_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        RowFilter.from_config(config)


# --------------------------------------------------------------------------- real data

# Proposed internal / external partitions of covid-chestxray (external = the include part).
PARTITIONS = {
    "eurorad": {"url": ["eurorad.org"]},
    "radiopaedia": {"url": ["radiopaedia.org"]},
    "americas_australia": {"location": ["usa", "canada", "argentina", "colombia", "australia"]},
}
# (covid, non-covid) of the external part, of the internal part: computed with pandas below and
# written here so a change in the reader or the data shows.
EXPECTED = {
    "eurorad": ((28, 35), (399, 65)),
    "radiopaedia": ((67, 32), (360, 68)),
    "americas_australia": ((34, 29), (393, 71)),
}


def pandas_part(root: Path, patterns: dict[str, list[str]], include: bool) -> pd.DataFrame:
    """The reader's rules written again with pandas: frontal X-rays with an image, the filter,
    first row of each file name."""
    table = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False, encoding="utf-8-sig")
    frontal = {"pa", "ap", "ap supine", "ap semi erect"}
    keep = (table["modality"].str.strip().str.lower() == "x-ray") & table["view"].str.strip().str.lower().isin(frontal)
    hit = pd.Series(True, index=table.index)
    for column, values in patterns.items():
        cells = table[column].str.strip().str.lower()
        hit &= cells.apply(lambda cell: any(v in cell for v in values))
    keep &= hit if include else ~hit
    present = set(os.listdir(root / "images"))
    table = table[keep & table["filename"].str.strip().isin(present) & (table["patientid"].str.strip() != "")]
    table = table.drop_duplicates("filename", keep="first")
    tokens = table["finding"].str.lower().str.split(r"[,/]")
    return table.assign(covid=tokens.apply(lambda t: any(x.strip() == "covid-19" for x in t)))


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(PARTITIONS))
def test_real_partitions_match_pandas(covid_chestxray_root, name):
    patterns = PARTITIONS[name]
    parts = {}
    for side, config in (("external", {"include": patterns}), ("internal", {"exclude": patterns})):
        result = read_covid_chestxray(covid_chestxray_root, {"row_filter": config})
        labels = Counter(int(s.labels["COVID-19"]) for s in result.samples)
        expected = pandas_part(covid_chestxray_root, patterns, include=side == "external")
        assert sorted(s.image_id for s in result.samples) == sorted(expected["filename"].str.strip())
        assert (labels[1], labels[0]) == (int(expected["covid"].sum()), int((~expected["covid"]).sum()))
        parts[side] = result
    (external_counts, internal_counts) = EXPECTED[name]
    count = lambda r: (sum(int(s.labels["COVID-19"]) for s in r.samples),  # noqa: E731
                       sum(1 - int(s.labels["COVID-19"]) for s in r.samples))
    assert count(parts["external"]) == external_counts
    assert count(parts["internal"]) == internal_counts
    # Together they are the whole collection (527 images), and no patient is in both.
    assert len(parts["external"].samples) + len(parts["internal"].samples) == 527
    patients = [{s.patient_id for s in parts[side].samples} for side in ("external", "internal")]
    assert not patients[0] & patients[1]
