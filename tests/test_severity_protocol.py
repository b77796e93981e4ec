"""The published severity protocol: grouped half splits, least squares, scores, baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import GroupShuffleSplit

from caaxr_tf.metrics.regression import pearson_r, regression_scores
from caaxr_tf.severity.protocol import (
    BASELINE_NAME,
    MeanStd,
    evaluate_least_squares,
    fit_least_squares,
    format_protocol_table,
    intercept_only_baseline,
    main,
)
from caaxr_tf.severity.splits import grouped_half_split, grouped_half_splits, ordered_groups

REPO = Path(__file__).resolve().parents[1]


def random_groups(seed: int, num_samples: int = 61, num_groups: int = 23) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 400), size=num_groups, replace=False)
    return [str(ids[i]) for i in rng.integers(0, num_groups, size=num_samples)]


# --------------------------------------------------------------------------- splits


def test_splits_equal_sklearn_group_shuffle_split_with_integer_ids():
    groups = random_groups(0)
    splits = grouped_half_splits(groups, num_splits=50)
    assert [s.seed for s in splits] == list(range(50))
    as_int = np.array([int(g) for g in groups])
    for split in splits:
        reference = GroupShuffleSplit(train_size=0.5, test_size=0.5, random_state=split.seed)
        train, test = next(reference.split(np.zeros(len(groups)), groups=as_int))
        np.testing.assert_array_equal(split.train, train)
        np.testing.assert_array_equal(split.test, test)


def test_non_numeric_ids_are_ordered_as_text_like_sklearn():
    groups = [f"p{g}" for g in random_groups(1)]
    assert ordered_groups(["10", "9", "-3", "9"]) == ["-3", "9", "10"]
    assert ordered_groups(["10", "9", "x"]) == ["10", "9", "x"]
    for seed in (0, 7):
        train, test = next(
            GroupShuffleSplit(train_size=0.5, test_size=0.5, random_state=seed).split(groups, groups=groups)
        )
        split = grouped_half_split(groups, seed)
        np.testing.assert_array_equal(split.train, train)
        np.testing.assert_array_equal(split.test, test)


def test_halves_are_disjoint_by_patient_and_cover_every_image():
    groups = random_groups(2, num_samples=40, num_groups=15)
    distinct = set(groups)
    sizes = set()
    for split in grouped_half_splits(groups, num_splits=20, first_seed=100):
        train_groups = {groups[i] for i in split.train}
        test_groups = {groups[i] for i in split.test}
        assert not train_groups & test_groups
        assert (len(test_groups), len(train_groups)) == (8, 7)  # ceil and floor of 15 / 2
        assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(40))
        sizes.add(len(split.test))
    assert len(sizes) > 1  # halves of patients, not of images
    seeds = [s.seed for s in grouped_half_splits(groups, num_splits=3, first_seed=100)]
    assert seeds == [100, 101, 102]
    first, second = grouped_half_splits(groups, num_splits=2)
    assert not np.array_equal(first.test, second.test)


def test_split_arguments_are_checked():
    with pytest.raises(ValueError, match="at least 2 groups"):
        grouped_half_split(["1", "1"], 0)
    with pytest.raises(ValueError, match="num_splits"):
        grouped_half_splits(["1", "2"], num_splits=0)


# Run here and in a fresh interpreter that imports only NumPy and the split module.
SPLIT_DIGEST = """
import hashlib, json
import numpy as np
from caaxr_tf.severity.splits import grouped_half_splits
rng = np.random.default_rng(3)
ids = rng.choice(np.arange(1, 400), size=23, replace=False)
groups = [str(ids[i]) for i in rng.integers(0, 23, size=61)]
text = json.dumps([[s.train.tolist(), s.test.tolist()] for s in grouped_half_splits(groups, num_splits=50)])
print(hashlib.sha256(text.encode()).hexdigest())
print(" ".join(sorted(m for m in __import__("sys").modules if m.split(".")[0] in ("tensorflow", "keras"))))
"""


def test_splits_are_the_same_in_another_process(capsys):
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    other = subprocess.run(
        [sys.executable, "-c", SPLIT_DIGEST], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    digest, heavy_modules = (other.stdout.split("\n") + [""])[:2]
    assert heavy_modules == ""  # the split code runs without TensorFlow or Keras
    exec(SPLIT_DIGEST, {})
    assert capsys.readouterr().out.split("\n")[0] == digest
    assert len(digest) == 64


# --------------------------------------------------------------------------- scores and least squares


def test_regression_scores_match_sklearn_and_scipy():
    rng = np.random.default_rng(4)
    truth = rng.uniform(0, 8, size=37)
    predicted = truth + rng.normal(0, 1.5, size=37)
    scores = regression_scores(truth, predicted)
    assert scores["mae"] == pytest.approx(mean_absolute_error(truth, predicted), rel=1e-12)
    assert scores["mse"] == pytest.approx(mean_squared_error(truth, predicted), rel=1e-12)
    assert scores["r2"] == pytest.approx(r2_score(truth, predicted), rel=1e-12)
    assert scores["pearson_r"] == pytest.approx(pearsonr(truth, predicted)[0], rel=1e-12)

    constant = regression_scores(truth, np.full(37, 3.3))
    assert np.isnan(constant["pearson_r"])
    assert constant["r2"] == pytest.approx(r2_score(truth, np.full(37, 3.3)), rel=1e-12)
    assert np.isnan(regression_scores(np.full(5, 2.0), np.arange(5.0))["r2"])
    assert np.isnan(pearson_r([1.0], [2.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        regression_scores(truth, predicted[:-1])


@pytest.mark.parametrize("num_images, num_features", [(40, 5), (20, 50)])
def test_least_squares_matches_sklearn_linear_regression(num_images, num_features):
    rng = np.random.default_rng(num_images)
    features = rng.normal(size=(num_images, num_features)) * rng.uniform(0.1, 5, num_features) + 3
    targets = rng.normal(size=(num_images, 2)) + features[:, :2] @ np.array([[1.0, 0.3], [-2.0, 0.5]])
    fit = fit_least_squares(features, targets)
    reference = LinearRegression().fit(features, targets)
    np.testing.assert_allclose(fit.coef, reference.coef_.T, atol=1e-10)
    np.testing.assert_allclose(fit.intercept, reference.intercept_, atol=1e-10)
    new = rng.normal(size=(7, num_features))
    np.testing.assert_allclose(fit.predict(new), reference.predict(new), atol=1e-9)

    mean_only = fit_least_squares(np.zeros((num_images, 0)), targets)
    np.testing.assert_allclose(mean_only.predict(np.zeros((3, 0))), np.tile(targets.mean(axis=0), (3, 1)))


def test_protocol_equals_an_independent_sklearn_run():
    groups = random_groups(5, num_samples=48, num_groups=18)
    rng = np.random.default_rng(5)
    features = rng.normal(size=(48, 3))
    targets = np.stack([features @ [1.0, 0.5, 0.0] + rng.normal(0, 0.5, 48) + 4,
                        features @ [0.2, 0.0, 1.0] + rng.normal(0, 0.5, 48) + 3], axis=1)
    result = evaluate_least_squares(features, targets, groups, target_names=("a", "b"), num_splits=12, name="x")

    expected = {("a", m): [] for m in ("mae", "mse", "r2", "pearson_r")} | {("b", m): [] for m in ("mae", "mse", "r2", "pearson_r")}
    as_int = np.array([int(g) for g in groups])
    for seed in range(12):
        train, test = next(GroupShuffleSplit(train_size=0.5, test_size=0.5, random_state=seed).split(features, groups=as_int))
        predicted = LinearRegression().fit(features[train], targets[train]).predict(features[test])
        for column, target in enumerate("ab"):
            y, p = targets[test, column], predicted[:, column]
            expected[target, "mae"].append(mean_absolute_error(y, p))
            expected[target, "mse"].append(mean_squared_error(y, p))
            expected[target, "r2"].append(r2_score(y, p))
            expected[target, "pearson_r"].append(pearsonr(y, p)[0])
    summary = result.summary()
    for (target, metric), values in expected.items():
        assert summary[target][metric].mean == pytest.approx(np.mean(values), rel=1e-9)
        assert summary[target][metric].std == pytest.approx(np.std(values, ddof=1), rel=1e-9)
        assert summary[target][metric].count == 12

    rows = result.rows()
    assert len(rows) == 12 and rows[0]["model"] == "x" and rows[3]["fold"] == 3
    assert rows[0]["a_mae"] == pytest.approx(expected["a", "mae"][0], rel=1e-9)
    held_out = result.held_out_predictions()
    for image in (0, 17):
        in_test = [s for s in range(12) if image in result.splits[s].test]
        assert held_out[image, 0] == pytest.approx(np.mean(result.test_predictions[in_test, image, 0]))


def test_baseline_on_a_hand_made_dataset():
    # patients 1..4; a patient's images share one score so the expected values are easy to follow
    groups = ["1", "1", "2", "3", "3", "3", "4"]
    scores = np.array([2.0, 2.0, 4.0, 6.0, 6.0, 6.0, 0.0])
    result = intercept_only_baseline(scores, groups, target_names=("score",), num_splits=6)
    assert result.name == BASELINE_NAME and result.num_features == 0
    maes = []
    for split in result.splits:
        test_patients = {groups[i] for i in split.test}
        assert len(test_patients) == 2 and len({groups[i] for i in split.train}) == 2
        mean = scores[split.train].mean()
        np.testing.assert_allclose(result.test_predictions[split.seed, split.test, 0], mean)
        assert np.isnan(result.test_predictions[split.seed, split.train, 0]).all()
        maes.append(np.abs(scores[split.test] - mean).mean())
    summary = result.summary()["score"]
    assert summary["mae"].mean == pytest.approx(np.mean(maes))
    assert summary["mae"].std == pytest.approx(np.std(maes, ddof=1))
    assert summary["pearson_r"].count == 0 and np.isnan(summary["pearson_r"].mean)

    table = format_protocol_table([result], markdown=False)
    line = next(row for row in table.splitlines() if row.startswith(BASELINE_NAME))
    assert f"{np.mean(maes):.2f} ± {np.std(maes, ddof=1):.2f}" in line and line.rstrip().endswith("–")
    assert str(MeanStd.of([1.0, 3.0, float("nan")])) == "2.00 ± 1.41"


def test_protocol_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="disagree on N"):
        evaluate_least_squares(np.zeros((4, 1)), np.zeros((5, 1)), list("aabbc"), target_names=("t",))
    with pytest.raises(ValueError, match=r"feature column\(s\) \[1\]"):
        evaluate_least_squares(np.array([[0.0, np.nan]] * 4), np.zeros(4), list("aabb"), target_names=("t",))
    with pytest.raises(ValueError, match="target names"):
        evaluate_least_squares(np.zeros((4, 1)), np.zeros((4, 2)), list("aabb"), target_names=("t",))


# --------------------------------------------------------------------------- the real collection


def _published_scores(root: Path) -> tuple[np.ndarray, list[str]]:
    """All 94 scored rows with their patient ids, whether or not the image is present."""
    scores = pd.read_csv(root / "annotations" / "covid-severity-scores.csv", skiprows=5)
    metadata = pd.read_csv(root / "metadata.csv", dtype=str).drop_duplicates("filename")
    patients = metadata.set_index("filename").loc[scores["filename"], "patientid"].tolist()
    return scores[["geographic_mean", "opacity_mean"]].to_numpy(), patients


@pytest.mark.realdata
def test_baseline_reproduces_the_published_numbers_on_the_94_images(covid_chestxray_root):
    targets, patients = _published_scores(covid_chestxray_root)
    assert targets.shape == (94, 2) and len(set(patients)) == 65
    summary = intercept_only_baseline(targets, patients, target_names=("geo", "opa")).summary()
    # Cohen et al. 2020, "No data": MAE 2.07 ± 0.17, R² -0.09 ± 0.09, MSE 5.97 ± 0.90
    geo = {metric: (round(v.mean, 2), round(v.std, 2)) for metric, v in summary["geo"].items() if v.count}
    assert geo == {"mae": (2.07, 0.17), "mse": (5.97, 0.90), "r2": (-0.09, 0.09)}
    opa = {metric: (round(v.mean, 2), round(v.std, 2)) for metric, v in summary["opa"].items() if v.count}
    assert opa == {"mae": (1.29, 0.10), "mse": (2.40, 0.37), "r2": (-0.08, 0.10)}


@pytest.mark.realdata
def test_baseline_command_on_the_93_images(covid_chestxray_root, tmp_path, capsys):
    out = tmp_path / "baseline.json"
    plot = tmp_path / "baseline.png"
    assert main(["--data", str(covid_chestxray_root), "--json", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr()
    assert "93 scored images of 64 patients, 1 skipped" in printed.out
    assert "covid-19-pneumonia-14-PA.png" in printed.err
    line = next(row for row in printed.out.splitlines() if row.startswith(BASELINE_NAME))
    for cell in ("2.10 ± 0.15", "6.02 ± 0.77", "-0.07 ± 0.10", "1.30 ± 0.10", "2.45 ± 0.33"):
        assert cell in line
    saved = json.loads(out.read_text())
    assert saved["num_images"] == 93 and saved["num_splits"] == 50 and len(saved["splits"]) == 50
    assert saved["summary"]["geographic_extent"]["mae"]["mean"] == pytest.approx(2.10, abs=0.005)
    assert saved["summary"]["opacity"]["pearson_r"] == {"mean": None, "std": None, "count": 0}
    assert plot.read_bytes().startswith(b"\x89PNG") and sorted(p.name for p in tmp_path.iterdir()) == [
        "baseline.json", "baseline.png"
    ]
