"""Constant-prediction baselines of classifiers: the floor printed beside every CV table."""

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
