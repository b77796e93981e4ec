"""CT slice selection and the patient rule against hand-computed examples, and the select command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from caaxr_tf.ct import count_dark_pixels, decide_patient, select_from_counts, select_slices
from caaxr_tf.ct.select import select_series
from caaxr_tf.data.ct_series import find_ct_series

REPO = Path(__file__).resolve().parents[1]
TISSUE = 1000  # a raw value that is not dark


def slice_with_dark_pixels(count: int) -> np.ndarray:
    """A 512x512 slice with exactly ``count`` dark pixels in rows 240..339, cols 120..369.

    The region's first ``count`` pixels in raster order are 299 (dark), the others 300 (the
    first value that is not dark); just outside the region every pixel is 0 (dark, not counted).
    """
    pixels = np.full((512, 512), TISSUE, np.uint16)
    pixels[239, :] = 0
    pixels[340, :] = 0
    pixels[:, 119] = 0
    pixels[:, 370] = 0
    region = np.full(100 * 250, 300, np.uint16)
    region[:count] = 299
    pixels[240:340, 120:370] = region.reshape(100, 250)
    return pixels


def test_count_covers_exactly_the_region():
    assert count_dark_pixels(slice_with_dark_pixels(0)) == 0
    assert count_dark_pixels(slice_with_dark_pixels(25000)) == 25000
    corners = np.full((512, 512), TISSUE, np.uint16)
    for row, col in ((240, 120), (240, 369), (339, 120), (339, 369)):  # inside
        corners[row, col] = 0
    for row, col in ((239, 120), (240, 119), (340, 369), (339, 370)):  # just outside
        corners[row, col] = 0
    assert count_dark_pixels(corners) == 4


def test_hand_computed_sequence_with_a_tie_at_the_threshold():
    # The paper's example: counts 30 .. 3,030 give threshold (3030 - 30) / 1.5 = 2000.
    counts = [30, 1999, 2000, 2001, 3030, 500]
    volume = np.stack([slice_with_dark_pixels(c) for c in counts])
    selection = select_slices(volume)
    assert selection.counts.tolist() == counts
    assert selection.threshold == 2000.0
    # 2000 is not > 2000: a slice exactly at the threshold is discarded.
    assert selection.kept.tolist() == [False, False, False, True, True, False]
    assert selection.kept_indices == [3, 4]
    assert (selection.num_kept, selection.total) == (2, 6)


def test_array_and_one_slice_at_a_time_agree():
    counts = [0, 120, 7000, 9000, 8999, 300, 12]
    volume = np.stack([slice_with_dark_pixels(c) for c in counts])
    from_array = select_slices(volume)
    from_iterable = select_slices(slice_with_dark_pixels(c) for c in counts)
    assert from_array.counts.tolist() == from_iterable.counts.tolist() == counts
    assert from_array.kept.tolist() == from_iterable.kept.tolist()
    # (9000 - 0) / 1.5 = 6000
    assert from_array.threshold == 6000.0
    assert from_array.kept.tolist() == [False, False, True, True, True, False, False]


@pytest.mark.parametrize(
    "counts, threshold, kept",
    [
        ([500, 500, 500], 0.0, [True, True, True]),  # constant: max == min, all > 0
        ([0, 0], 0.0, [False, False]),  # no dark pixel anywhere
        ([0, 3, 2], 2.0, [False, True, False]),  # tie at a whole threshold
        ([0, 1, 1], 1 / 1.5, [False, True, True]),  # threshold 0.67
        ([25000, 0], 25000 / 1.5, [True, False]),
    ],
)
def test_threshold_edge_cases(counts, threshold, kept):
    selection = select_from_counts(counts)
    assert selection.threshold == pytest.approx(threshold, abs=0, rel=1e-15)
    assert selection.kept.tolist() == kept


def test_integer_rule_equals_the_published_float_rule():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        counts = rng.integers(0, rng.choice([4, 30, 25001]), size=rng.integers(2, 12))
        published = np.array(counts) > (counts.max() - counts.min()) / 1.5
        assert select_from_counts(counts).kept.tolist() == published.tolist()


def test_bad_sequences_raise():
    with pytest.raises(ValueError, match="at least 2 slices"):
        select_from_counts([1234])
    with pytest.raises(ValueError, match="at least 2 slices"):
        select_slices(np.zeros((1, 512, 512), np.uint16))
    with pytest.raises(ValueError, match="512x512"):
        select_slices([np.zeros((512, 512)), np.zeros((256, 256))])
    with pytest.raises(ValueError, match="0..25000"):
        select_from_counts([0, 25001])


def test_a_long_sequence_is_counted_one_slice_at_a_time():
    def sequence():
        for index in range(406):
            yield slice_with_dark_pixels(index * 50)

    tracemalloc.start()
    selection = select_slices(sequence())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert selection.total == 406
    assert selection.threshold == pytest.approx(405 * 50 / 1.5)
    assert selection.kept_indices == list(range(271, 406))  # 50 i > 13500 <=> i > 270
    # 406 slices are 213 MB; counting one at a time needs a few slices' worth.
    assert peak < 8 * 2**20


# --- patient rule --------------------------------------------------------------------------


def test_patient_rule_at_exactly_ten_percent():
    three_of_thirty = decide_patient([True] * 3 + [False] * 27)
    assert (three_of_thirty.selected, three_of_thirty.covid_slices) == (30, 3)
    assert three_of_thirty.covid_threshold1 and three_of_thirty.covid_threshold2
    two_of_thirty = decide_patient([True] * 2 + [False] * 28)
    assert two_of_thirty.covid_threshold1 and not two_of_thirty.covid_threshold2
    one_of_eleven = decide_patient([False] * 10 + [True])
    assert one_of_eleven.covid_threshold1 and not one_of_eleven.covid_threshold2
    assert one_of_eleven.covid_indices == (10,)
    one_of_ten = decide_patient([True] + [False] * 9)
    assert one_of_ten.covid_threshold2


def test_patient_rule_equals_the_published_comparison():
    for selected in range(1, 121):
        for covid in range(selected + 1):
            decision = decide_patient([True] * covid + [False] * (selected - covid))
            assert decision.covid_threshold2 == (covid >= 0.1 * selected)
            assert decision.covid_threshold1 == (covid > 0)


def test_patient_rule_without_covid_or_without_slices():
    normal = decide_patient([False] * 40)
    assert not normal.covid_threshold1 and not normal.covid_threshold2 and normal.covid_indices == ()
    empty = decide_patient([])
    assert empty.selected == 0 and not empty.covid_threshold1 and not empty.covid_threshold2
    assert empty.covid_share == 0.0


def test_patient_rule_from_probabilities():
    decision = decide_patient(np.array([0.5, 0.4999, 0.9, 0.1]))
    assert decision.covid_indices == (0, 2)  # 0.5 counts as COVID (argmax picks index 0 on ties)
    assert decision.as_dict() == {"selected": 4, "covid_slices": 2, "covid_indices": [0, 2],
                                  "covid_threshold1": True, "covid_threshold2": True}
    assert decide_patient([0.3, 0.8], probability_threshold=0.9).covid_slices == 0
    assert decide_patient([True] * 2 + [False] * 6, share=0.25).covid_threshold2
    assert not decide_patient([True] * 1 + [False] * 7, share=0.25).covid_threshold2
    for bad in ([0.2, 1.5], [np.nan, 0.1], [[0.1, 0.2]]):
        with pytest.raises(ValueError):
            decide_patient(bad)


# --- the command ---------------------------------------------------------------------------


def write_series(folder: Path, counts: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, count in enumerate(counts, start=1):
        path = folder / f"IM{number:05d}.tif"
        assert cv2.imwrite(str(path), slice_with_dark_pixels(count))
        paths.append(path)
    return paths


def run_select(*paths: Path) -> tuple[int, list[dict]]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.run([sys.executable, "-m", "caaxr_tf.ct.select", *map(str, paths)],
                             capture_output=True, text=True, env=env, timeout=120)
    return process.returncode, [json.loads(line) for line in process.stdout.splitlines()]


def test_command_prints_slices_series_and_skipped_inputs(tmp_path):
    patient = tmp_path / "covid1" / "patient7"
    counts = [30, 1999, 2000, 2001, 3030, 500, 40, 45, 2500, 2100, 31, 60]  # IM00001 .. IM00012
    write_series(patient / "SR_2", counts)
    assert cv2.imwrite(str(patient / "SR_2" / "IM00013.tif"), np.zeros((512, 512), np.uint8))
    (patient / "SR_2" / "IM00014.tif").write_bytes(b"not an image")
    write_series(patient / "SR_3", [100])  # a series of one slice

    status, records = run_select(patient)
    assert status == 0
    skipped = {(Path(r["path"]).relative_to(patient).as_posix(), r["field"]) for r in records if r["type"] == "skipped"}
    assert skipped == {("SR_2/IM00013.tif", "BitsPerSample"), ("SR_2/IM00014.tif", "file"), ("SR_3", "slices")}
    slices = [r for r in records if r["type"] == "slice"]
    # File names sort as numbers, so IM00010 follows IM00009.
    assert [Path(r["file"]).name for r in slices] == [f"IM{n:05d}.tif" for n in range(1, 13)]
    assert [r["dark_pixels"] for r in slices] == counts
    assert [r["index"] for r in slices] == list(range(12))
    assert [r["kept"] for r in slices] == [c > 2000 for c in counts]
    assert {r["series"] for r in slices} == {"patient7/SR_2"}
    (series,) = [r for r in records if r["type"] == "series"]
    assert series == {"type": "series", "series": "patient7/SR_2", "patient": "patient7",
                      "folder": str(patient / "SR_2"), "threshold": 2000.0, "kept": 4, "total": 12}

    status, records = run_select(patient / "SR_3")
    assert status == 1 and [r["type"] for r in records] == ["skipped"]


def test_command_on_a_dicom_series_sorts_by_instance_number(tmp_path):
    from caaxr_tf.data.synthetic_ct import write_dicom_series

    counts = [0, 2600, 9000, 12000, 11000, 4000, 300]
    volume = np.stack([slice_with_dark_pixels(c) for c in counts])
    paths = write_dicom_series(tmp_path / "dicom", volume, patient_id="P9", seed=3)
    assert sorted(p.name for p in paths) != [p.name for p in paths]  # names do not follow the order
    status, records = run_select(tmp_path / "dicom")
    assert status == 0
    slices = [r for r in records if r["type"] == "slice"]
    assert [r["dark_pixels"] for r in slices] == counts
    assert [r["file"] for r in slices] == [str(p) for p in paths]
    (series,) = [r for r in records if r["type"] == "series"]
    assert (series["patient"], series["threshold"], series["kept"], series["total"]) == ("P9", 8000.0, 3, 7)


def test_select_series_reports_a_slice_that_cannot_be_decoded(tmp_path):
    paths = write_series(tmp_path / "p1" / "SR_2", [10, 5000, 9000, 20])
    data = paths[1].read_bytes()
    (scan,) = [find_ct_series(tmp_path / "p1")]
    paths[1].write_bytes(data[: len(data) // 2])  # truncated after the header check
    outcome = select_series(scan.series[0])
    # the decoder checks the header first (as check_ct_tiff does): the directory is past the end
    assert [s.field for s in outcome.skipped] == ["IFD"] and outcome.skipped[0].path == str(paths[1])
    assert outcome.paths == [str(p) for p in (paths[0], paths[2], paths[3])]
    assert outcome.selection.counts.tolist() == [10, 9000, 20]
    assert outcome.kept_paths == [str(paths[2])]


class _ArraySeries:
    """A CTSeries stand-in whose slices come from an array (what ``classify_patient`` reads)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        self.series_id, self.folder = "p1/SR_1", "p1/SR_1"
        self.paths = tuple(f"p1/SR_1/IM{i:04d}.tif" for i in range(len(pixels)))

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int, shape=(512, 512)) -> np.ndarray:
        return self.pixels[index]


def test_patient_pipeline_and_selection_count_the_299_300_boundary_alike():
    """299 is dark, 300 is not: both paths count the same, and equal an independent numpy count."""
    from caaxr_tf.ct.patients import classify_patient

    rng = np.random.default_rng(3)
    volume = np.full((4, 512, 512), TISSUE, np.uint16)
    volume[:, 240:340, 120:370] = rng.choice(np.array([299, 300], np.uint16), size=(4, 100, 250))
    volume[1, 240:340, 120:370] = 300  # a slice with no dark pixel at all, every value on the boundary
    volume[2, 240:340, 120:370] = 299  # every region pixel dark
    volume[:, 239, :] = 0  # dark just outside the region: not counted
    volume[:, :, 370] = 0

    # Independent count: the coordinates of every value <= 299, kept when they lie in the region.
    expected = []
    for pixels in volume:
        rows, cols = np.nonzero(pixels.astype(np.int64) <= 299)
        expected.append(int(np.sum((rows >= 240) & (rows < 340) & (cols >= 120) & (cols < 370))))
    assert expected[1] == 0 and expected[2] == 25000 and 0 < expected[0] < 25000

    selection = select_slices(volume)
    result = classify_patient("p1", [_ArraySeries(volume)], lambda images: np.zeros(len(images), bool),
                              image_size=512, workers=1)
    pipeline = result.series[0].selection
    assert selection.counts.tolist() == expected
    assert pipeline.counts.tolist() == expected
    assert [count_dark_pixels(pixels) for pixels in volume] == expected
    assert pipeline.kept.tolist() == selection.kept.tolist()
