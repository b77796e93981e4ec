"""Constant-prediction baselines: classifiers (the floor printed beside every CV table) and the
intercept-only regression baseline."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from caaxr_tf.cv import format_baselines_table
from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.tasks.classification import ClassificationTask


@pytest.fixture(scope="module")
def protocol_dir(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline_tfrecords")
    tfr.build_tfrecords(tiny_data_root, out, protocols=["3class"], workers=1, progress=False, log=lambda line: None)
    return out / "3class"


def test_constant_majority_prediction_scores(protocol_dir):
    summary = json.loads((protocol_dir / "summary.json").read_text())
    with open(protocol_dir / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    training = Counter(r["label"] for r in rows if r["split_fold1"] == "train")
    majority = training.most_common(1)[0][0]
    test = Counter(r["label"] for r in rows if r["split_fold1"] == "test")

    task = ClassificationTask(summary["classes"])
    baselines = task.baselines(protocol_dir, "test", 1, [])[""]
    assert list(baselines) == [f"constant ({majority})"]
    metrics = baselines[f"constant ({majority})"]
    assert metrics["num_images"] == sum(test.values())
    assert metrics["accuracy"] == pytest.approx(test[majority] / sum(test.values()))
    assert metrics["auc_per_class"] == {name: 0.5 for name in summary["classes"]}
    assert metrics["sensitivity_at_99_specificity"] == 0.0

    columns = task.paper_columns()
    table = format_baselines_table({"": baselines}, columns, task, markdown=True)
    assert f"| constant ({majority}) | 0.500 | 0.500 | 0.500 | 0.000 |" in table
    assert table.rstrip().endswith(f"| {test[majority] / sum(test.values()):.3f} |")


def test_regression_intercept_only_baseline_uses_the_training_mean_not_the_test_mean(tmp_path):
    """A protocol that is not grouped halves: every test image gets the *training* split's mean
    (train mean 2 / 20, test mean 11 / 5, val 100 / 100 ignored), so MAE, MSE and R² are those of
    that constant; predicting the test mean would give R² = 0."""
    import numpy as np
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    from caaxr_tf.tasks.regression import RegressionTask

    rows = [("t1", "train", 1.0, 30.0), ("t2", "train", 2.0, 10.0), ("t3", "train", 3.0, 20.0),
            ("v1", "val", 100.0, 100.0),
            ("s1", "test", 8.0, 1.0), ("s2", "test", 10.0, 4.0), ("s3", "test", 12.0, 6.0), ("s4", "test", 14.0, 9.0)]
    (tmp_path / "summary.json").write_text(json.dumps({"protocol": "reg", "split_scheme": "fixed", "folds": 1}))
    with open(tmp_path / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "split_fold1", "target_extent", "target_opacity"])
        writer.writerows(rows)
    task = RegressionTask([], target_names=["extent", "opacity"])
    (label, metrics), = task.baselines(tmp_path, "test", 1, [])[""].items()
    assert label == "training mean (intercept only)" and metrics["num_images"] == 4
    truth = np.array([[r[2], r[3]] for r in rows if r[1] == "test"])
    training_mean = np.array([2.0, 20.0])
    assert not np.allclose(truth.mean(axis=0), training_mean)
    for j, name in enumerate(["extent", "opacity"]):
        constant = np.full(4, training_mean[j])
        # float64 numpy against float64 scikit-learn on a few numbers: equal to rounding
        assert metrics[f"{name}_mae"] == pytest.approx(mean_absolute_error(truth[:, j], constant), rel=1e-12)
        assert metrics[f"{name}_mse"] == pytest.approx(mean_squared_error(truth[:, j], constant), rel=1e-12)
        assert metrics[f"{name}_r2"] == pytest.approx(r2_score(truth[:, j], constant), rel=1e-12)
        assert metrics[f"{name}_r2"] < -1  # the test mean would score R² = 0
    assert metrics["extent_mae"] == pytest.approx(9.0, rel=1e-12)  # |8..14 - 2|
    assert metrics["opacity_mae"] == pytest.approx(15.0, rel=1e-12)  # |1, 4, 6, 9 - 20|
