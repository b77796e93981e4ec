"""Task.bootstrap_inputs (issue 23: intervals of every metric the tasks report): each task's
resampled metric, on the full rows, gives the numbers its evaluation reports."""

from __future__ import annotations

import numpy as np
import pytest

from caaxr_tf.infection.maps import detection_rates
from caaxr_tf.metrics import regression_scores
from caaxr_tf.metrics.classification import classification_metrics
from caaxr_tf.metrics.uncertainty import bootstrap
from caaxr_tf.scoring import intervals_from_rows
from caaxr_tf.tasks import get_task
from caaxr_tf.tasks.segmentation import segmentation_metrics

RNG = np.random.default_rng(11)


def test_classification_rows_give_the_evaluation_metrics():
    names = ["covid", "normal", "pneumonia"]
    labels = RNG.integers(0, 3, 50)
    scores = RNG.dirichlet(np.ones(3), 50)
    rows = [[f"i{k}", names[t], names[int(np.argmax(s))], *(f"{v:.6f}" for v in s)]
            for k, (t, s) in enumerate(zip(labels, scores))]
    inputs = get_task("classification")(names).bootstrap_inputs(["image_id", "label", "predicted",
                                                                  *(f"p_{n}" for n in names)], rows)
    got = inputs.metric(inputs.y_true, inputs.y_score, **inputs.kwargs)
    rounded = np.array([[float(v) for v in row[3:]] for row in rows])
    expected = classification_metrics(labels, rounded, names)
    assert got["auc_per_class"] == expected["auc_per_class"] and got["accuracy"] == expected["accuracy"]


def test_segmentation_rows_give_mean_dice_and_iou():
    dice, iou = RNG.random(30), RNG.random(30)
    rows = [[f"i{k}", f"{d:.6f}", f"{j:.6f}", 10, 12] for k, (d, j) in enumerate(zip(dice, iou))]
    inputs = get_task("segmentation")([]).bootstrap_inputs(["image_id", "dice", "iou", "true_pixels",
                                                             "predicted_pixels"], rows)
    got = inputs.metric(inputs.y_true, inputs.y_score)
    expected = segmentation_metrics(np.round(dice, 6), np.round(iou, 6))
    assert got == {"dice": pytest.approx(expected["dice"], abs=1e-12), "iou": pytest.approx(expected["iou"], abs=1e-12)}


def test_regression_rows_give_the_per_target_scores():
    names = ["geographic_extent", "opacity"]
    truth, predicted = RNG.random((40, 2)) * 6, RNG.random((40, 2)) * 6
    rows = [[f"i{k}", *(f"{v:.6f}" for v in t), *(f"{v:.6f}" for v in p)] for k, (t, p) in enumerate(zip(truth, predicted))]
    header = ["image_id", *(f"true_{n}" for n in names), *(f"predicted_{n}" for n in names)]
    task = get_task("regression")(["scored"], target_names=names)
    inputs = task.bootstrap_inputs(header, rows)
    got = inputs.metric(inputs.y_true, inputs.y_score, **inputs.kwargs)
    t6, p6 = np.round(truth, 6), np.round(predicted, 6)
    for j, name in enumerate(names):
        reference = regression_scores(t6[:, j], p6[:, j])
        for metric in ("mae", "mse", "r2", "pearson_r"):
            assert got[f"{name}_{metric}"] == pytest.approx(reference[metric], rel=1e-12, abs=1e-12)
    assert set(got) == set(task.scores(t6, p6)) - {"target_names", "per_target"}


def test_infection_rows_give_dice_and_detection_rates():
    covid = RNG.random(40) < 0.5
    detected = RNG.random(40) < 0.6
    dice, iou = RNG.random(40), RNG.random(40)
    rows = [[f"i{k}", int(c), f"{d:.6f}", f"{j:.6f}", 5, 7, int(x)]
            for k, (c, d, j, x) in enumerate(zip(covid, dice, iou, detected))]
    header = ["image_id", "covid", "dice", "iou", "true_pixels", "infected_pixels", "covid_detected"]
    inputs = get_task("infection")(["covid", "non_covid"]).bootstrap_inputs(header, rows)
    got = inputs.metric(inputs.y_true, inputs.y_score)
    rates = detection_rates(covid, detected)
    assert got["sensitivity"] == pytest.approx(rates.sensitivity, abs=1e-12)
    assert got["specificity"] == pytest.approx(rates.specificity, abs=1e-12)
    assert got["dice_covid"] == pytest.approx(np.round(dice, 6)[covid].mean(), abs=1e-12)


def test_a_task_without_intervals_gives_none(tmp_path):
    rows = [["i0", "x"]]
    assert get_task("segmentation")([]).bootstrap_inputs(["image_id", "other"], rows) is None
    task = get_task("regression")(["scored"], target_names=["a"])
    assert intervals_from_rows(["image_id", "true_b"], rows, tmp_path, [], task=task) is None


def test_rows_without_a_manifest_count_each_image_as_a_patient(tmp_path):
    dice, iou = RNG.random(25), RNG.random(25)
    rows = [[f"i{k}", f"{d:.6f}", f"{j:.6f}", 1, 1] for k, (d, j) in enumerate(zip(dice, iou))]
    header = ["image_id", "dice", "iou", "true_pixels", "predicted_pixels"]
    task = get_task("segmentation")([])
    got = intervals_from_rows(header, rows, tmp_path / "absent", [], n_resamples=30, task=task)
    inputs = task.bootstrap_inputs(header, rows)
    expected = bootstrap(inputs.metric, inputs.y_true, inputs.y_score, n_resamples=30, seed=0)
    assert got["num_patients"] == 25
    assert got["dice"]["low"] == expected["dice"].low and got["dice"]["high"] == expected["dice"].high


def test_fold_mean_bootstrap_of_one_fold_is_the_bootstrap():
    from caaxr_tf.metrics.classification import headline_metrics
    from caaxr_tf.metrics.uncertainty import fold_mean_bootstrap

    labels, scores = RNG.integers(0, 2, 60), RNG.dirichlet([1, 1], 60)
    groups = [f"p{k // 3}" for k in range(60)]
    kwargs = dict(n_resamples=150, seed=4, class_names=["covid", "normal"])
    single = bootstrap(headline_metrics, labels, scores, groups=groups, **kwargs)
    assert fold_mean_bootstrap(headline_metrics, [(labels, scores, groups)], **kwargs) == single
    # the same fold twice: the mean over folds is the fold's value in every resample
    twice = fold_mean_bootstrap(headline_metrics, [(labels, scores, groups)] * 2, **kwargs)
    for key, interval in single.items():  # (a + a) / 2 may differ from a in the last bit
        assert (twice[key].low, twice[key].high) == pytest.approx((interval.low, interval.high), abs=1e-12), key


def test_fold_mean_bootstrap_against_a_direct_resampling():
    """Two folds on the same test patients (listed in other orders) with their own Dice: each
    resample draws patients once for both folds; the value is the mean of the two fold means."""
    from caaxr_tf.metrics.uncertainty import fold_mean_bootstrap
    from caaxr_tf.tasks.segmentation import mean_dice_iou

    patients = np.repeat(np.arange(12), 2)  # 24 images, 2 per patient
    dice_a, dice_b = RNG.random(24), RNG.random(24)
    order_b = RNG.permutation(24)
    folds = [(dice_a, dice_a, [f"p{p}" for p in patients]),
             (dice_b[order_b], dice_b[order_b], [f"p{p}" for p in patients[order_b]])]
    got = fold_mean_bootstrap(mean_dice_iou, folds, n_resamples=300, seed=9)["dice"]
    rng = np.random.default_rng(9)
    values = []
    for _ in range(300):
        drawn = rng.integers(0, 12, 12)  # patients numbered by first appearance: p0 .. p11 in fold 1
        a = np.concatenate([dice_a[patients == p] for p in drawn]).mean()
        b = np.concatenate([dice_b[patients == p] for p in drawn]).mean()
        values.append((a + b) / 2)
    assert got.estimate == pytest.approx((dice_a.mean() + dice_b.mean()) / 2, abs=1e-12)
    assert [got.low, got.high] == pytest.approx(list(np.percentile(values, [2.5, 97.5])), abs=1e-12)
