"""caaxr_tf.metrics against scikit-learn / numpy references, in Keras and under tf.distribute."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score, jaccard_score, roc_auc_score, roc_curve

from caaxr_tf.metrics import (
    ClasswiseAUC,
    Dice,
    IoU,
    SensitivityAtSpecificity,
    auc_per_class,
    dice_per_image,
    iou_per_image,
    sensitivity_at_specificity,
)

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)

ATOL = 1e-6  # float32 state and results against float64 references


# --------------------------------------------------------------------------- #
# References and data
# --------------------------------------------------------------------------- #


def ref_sens_at_spec(labels, scores, specificity, sample_weight=None) -> float:
    """sklearn: max TPR over all ROC points with specificity >= target."""
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=sample_weight, drop_intermediate=False)
    return float(tpr[1.0 - fpr >= specificity - 1e-12].max())


def quantize(scores, num_thresholds):
    """Scores rounded onto the metric's grid, with the metric's float32 arithmetic."""
    steps = np.float32(num_thresholds - 1)
    grid = np.round(np.clip(np.asarray(scores, np.float32), 0, 1) * steps)
    return grid.astype(np.float64) / float(num_thresholds - 1), grid.astype(np.int64)


def ref_mask_scores(y_true, y_pred, fn, threshold=0.5):
    truth = (y_true > 0.5).reshape(len(y_true), -1).astype(int)
    pred = (y_pred >= threshold).reshape(len(y_pred), -1).astype(int)
    return np.array([fn(t, p, zero_division=1.0) for t, p in zip(truth, pred)])


def random_masks(seed=0, n=12, size=8):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, size, size, 1)) < rng.random((n, 1, 1, 1))).astype("float32")
    y_pred = rng.random((n, size, size, 1)).astype("float32") * rng.random((n, 1, 1, 1)) * 1.6
    y_pred = np.clip(y_pred, 0, 1).astype("float32")
    y_true[:2] = 0.0  # empty truth ...
    y_pred[0] = 0.0  # ... with an empty prediction (empty policy) ...
    y_pred[1, 0, 0, 0] = 0.9  # ... and with a false positive
    return y_true, y_pred


def random_classification(seed=0, n=400, num_classes=3, ties=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 1.2 * np.eye(num_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if ties:
        probs = np.round(probs, 2)
    return labels, probs.astype("float32")


def one_hot(labels, num_classes=3):
    return np.eye(num_classes, dtype="float32")[labels]


def run_metric(metric, y_true, y_pred, sample_weight=None, batches=1):
    metric.reset_state()
    for part in np.array_split(np.arange(len(y_true)), batches):
        weight = None if sample_weight is None else sample_weight[part]
        metric.update_state(y_true[part], y_pred[part], sample_weight=weight)
    return keras.ops.convert_to_numpy(metric.result())


# --------------------------------------------------------------------------- #
# Dice / IoU
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "metric_cls, per_image, sk_fn",
    [(Dice, dice_per_image, f1_score), (IoU, iou_per_image, jaccard_score)],
)
def test_overlap_matches_sklearn_per_image(metric_cls, per_image, sk_fn):
    y_true, y_pred = random_masks()
    expected = ref_mask_scores(y_true, y_pred, sk_fn)
    assert expected[0] == 1.0 and expected[1] == 0.0
    np.testing.assert_allclose(per_image(y_true, y_pred), expected, rtol=0, atol=1e-12)
    assert run_metric(metric_cls(), y_true, y_pred) == pytest.approx(expected.mean(), abs=ATOL)
    # The mean over images is not the pooled score.
    pooled = sk_fn((y_true > 0.5).ravel(), (y_pred >= 0.5).ravel())
    assert abs(expected.mean() - pooled) > 1e-3
    # Channel-less ground truth, several batches, another threshold.
    expected_03 = ref_mask_scores(y_true, y_pred, sk_fn, threshold=0.3)
    result = run_metric(metric_cls(threshold=0.3), y_true[..., 0], y_pred, batches=4)
    assert result == pytest.approx(expected_03.mean(), abs=ATOL)


@pytest.mark.parametrize("metric_cls, per_image", [(Dice, dice_per_image), (IoU, iou_per_image)])
def test_overlap_hand_cases(metric_cls, per_image):
    empty = np.zeros((1, 4, 4, 1), "float32")
    full = np.ones((1, 4, 4, 1), "float32")
    half = full.copy()
    half[0, :2] = 0.0
    at_threshold = np.full((1, 4, 4, 1), 0.5, "float32")
    y_true = np.concatenate([empty, empty, full, full, half, full])
    y_pred = np.concatenate([empty, full, full, empty, full, at_threshold])
    # Dice(half, full) = 2*8/(8+16); IoU = 8/16; y_pred == threshold is foreground.
    overlap = 2 / 3 if metric_cls is Dice else 0.5
    expected = np.array([1.0, 0.0, 1.0, 0.0, overlap, 1.0])
    np.testing.assert_allclose(per_image(y_true, y_pred), expected, atol=1e-12)
    assert run_metric(metric_cls(), y_true, y_pred) == pytest.approx(expected.mean(), abs=ATOL)

    # empty_score policy: a value, or None to skip empty-vs-empty images.
    assert per_image(empty, empty, empty_score=0.0)[0] == 0.0
    assert run_metric(metric_cls(empty_score=0.0), y_true, y_pred) == pytest.approx(
        expected[1:].sum() / 6, abs=ATOL
    )
    assert np.isnan(per_image(empty, empty, empty_score=None)[0])
    skipping = metric_cls(empty_score=None)
    assert run_metric(skipping, y_true, y_pred) == pytest.approx(expected[1:].mean(), abs=ATOL)
    assert run_metric(skipping, empty, empty) == 0.0  # nothing scored


@pytest.mark.parametrize("metric_cls, sk_fn", [(Dice, f1_score), (IoU, jaccard_score)])
def test_overlap_sample_weight_and_state(metric_cls, sk_fn):
    y_true, y_pred = random_masks(seed=1)
    weights = np.random.default_rng(1).random(len(y_true)).astype("float32")
    expected = np.average(ref_mask_scores(y_true, y_pred, sk_fn), weights=weights)
    metric = metric_cls()
    assert run_metric(metric, y_true, y_pred, weights) == pytest.approx(expected, abs=ATOL)
    assert run_metric(metric, y_true, y_pred, weights[:, None], batches=5) == pytest.approx(
        expected, abs=ATOL
    )
    metric.reset_state()
    assert keras.ops.convert_to_numpy(metric.result()) == 0.0
    with pytest.raises(ValueError, match="one weight per example"):
        metric.update_state(y_true, y_pred, sample_weight=np.ones_like(y_true))


# --------------------------------------------------------------------------- #
# Sensitivity at specificity
# --------------------------------------------------------------------------- #


def test_sensitivity_hand_cases():
    # Scores of 5 negatives and 5 positives; thresholds t give (spec, sens):
    # t=0.9 -> (1.0, 0.2), t=0.8 -> (0.8, 0.4), t=0.7 -> (0.8, 0.6), t=0.5 -> (0.6, 0.8), ...
    scores = np.array([0.1, 0.2, 0.5, 0.8, 0.3, 0.9, 0.7, 0.5, 0.6, 0.4], "float32")
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.stack([1 - scores, scores], axis=1)
    for spec, sens in [(1.0, 0.2), (0.9, 0.2), (0.8, 0.6), (0.6, 1.0), (0.0, 1.0)]:
        assert sensitivity_at_specificity(labels, scores, spec) == pytest.approx(sens, abs=1e-12)
        assert ref_sens_at_spec(labels, scores, spec) == pytest.approx(sens, abs=1e-12)
        metric = SensitivityAtSpecificity(spec, class_id=1)
        assert run_metric(metric, labels, probs) == pytest.approx(sens, abs=ATOL)
        assert run_metric(metric, one_hot(labels, 2), probs) == pytest.approx(sens, abs=ATOL)

    # A target met exactly counts: 9 of 10 negatives below 0.95 gives spec 0.9.
    negatives = np.r_[np.linspace(0.0, 0.5, 9), 0.95]
    scores = np.r_[negatives, [0.97, 0.9, 0.6]].astype("float32")
    labels = np.r_[np.zeros(10), np.ones(3)]
    assert sensitivity_at_specificity(labels, scores, 0.9) == pytest.approx(1.0)
    single = SensitivityAtSpecificity(0.9, num_thresholds=101)
    assert run_metric(single, labels, scores[:, None]) == pytest.approx(1.0)

    # No negatives: any threshold qualifies. No positives: 0 (metric) / NaN (function).
    assert sensitivity_at_specificity(np.ones(3), [0.1, 0.2, 0.3], 0.99) == 1.0
    assert run_metric(SensitivityAtSpecificity(0.99), np.ones(3), np.array([[0.1], [0.2], [0.3]])) == 1.0
    assert np.isnan(sensitivity_at_specificity(np.zeros(3), [0.1, 0.2, 0.3], 0.99))
    assert run_metric(SensitivityAtSpecificity(0.99), np.zeros(3), np.array([[0.1], [0.2], [0.3]])) == 0.0


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("specificity, class_id", [(0.99, 0), (0.9, 0), (0.9, 2), (0.5, 1)])
def test_sensitivity_random_against_sklearn(ties, specificity, class_id):
    labels, probs = random_classification(seed=class_id + 10 * ties, ties=ties)
    positive = labels == class_id
    scores = probs[:, class_id]
    exact = ref_sens_at_spec(positive, scores, specificity)
    assert sensitivity_at_specificity(positive, scores, specificity) == pytest.approx(exact, abs=1e-12)

    metric = SensitivityAtSpecificity(specificity, class_id=class_id)
    result = run_metric(metric, labels, probs, batches=3)
    assert run_metric(metric, one_hot(labels), probs) == pytest.approx(result, abs=ATOL)
    # The histogram value is exactly the sklearn value of the grid-rounded scores ...
    rounded, _ = quantize(scores, metric.num_thresholds)
    assert result == pytest.approx(ref_sens_at_spec(positive, rounded, specificity), abs=ATOL)
    # ... which for 2-decimal ties (and, here, for distinct scores) is the exact value.
    assert result == pytest.approx(exact, abs=ATOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sensitivity_coarse_grid_error_bound(seed):
    # With 11 grid points distinct scores do share bins; the documented bound must hold.
    labels, probs = random_classification(seed=seed, n=300)
    positive, scores = labels == 0, probs[:, 0]
    num_thresholds = 11
    metric = SensitivityAtSpecificity(0.9, num_thresholds=num_thresholds)
    result = float(run_metric(metric, labels, probs))
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    feasible = 1.0 - fpr >= 0.9 - 1e-12
    exact = tpr[feasible].max()
    optimum = thresholds[feasible][tpr[feasible] == exact].max()
    _, bins = quantize(scores, num_thresholds)
    _, optimum_bin = quantize([optimum], num_thresholds)
    bound = np.sum(positive & (bins == optimum_bin[0]) & (scores >= optimum)) / positive.sum()
    assert result <= exact + ATOL
    assert exact - result <= bound + ATOL


def test_sensitivity_sample_weight():
    labels, probs = random_classification(seed=5, ties=True)
    weights = np.random.default_rng(5).integers(0, 4, len(labels)).astype("float32")
    positive = labels == 1
    expected = ref_sens_at_spec(positive, probs[:, 1], 0.9, sample_weight=weights)
    assert sensitivity_at_specificity(positive, probs[:, 1], 0.9, weights) == pytest.approx(expected)
    metric = SensitivityAtSpecificity(0.9, class_id=1)
    assert run_metric(metric, labels, probs, weights, batches=4) == pytest.approx(expected, abs=ATOL)
    # Integer weights are repetitions.
    repeat = np.repeat(np.arange(len(labels)), weights.astype(int))
    assert run_metric(metric, labels[repeat], probs[repeat]) == pytest.approx(expected, abs=ATOL)


def test_sensitivity_rejects_bad_arguments():
    with pytest.raises(ValueError):
        SensitivityAtSpecificity(1.5)
    with pytest.raises(ValueError, match="class_id"):
        SensitivityAtSpecificity(0.9, class_id=3).update_state(np.zeros(2), np.zeros((2, 3)))


# --------------------------------------------------------------------------- #
# Class-wise AUC
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("ties", [False, True])
def test_auc_random_against_sklearn(ties):
    labels, probs = random_classification(seed=3, n=500, ties=ties)
    expected = np.array([roc_auc_score(labels == c, probs[:, c]) for c in range(3)])
    metric = ClasswiseAUC(3, class_names=["covid", "pneumonia", "normal"])
    result = run_metric(metric, labels, probs, batches=4)
    assert result.shape == (3,)
    np.testing.assert_allclose(result, expected, atol=1e-3 if not ties else ATOL)
    np.testing.assert_allclose(run_metric(metric, one_hot(labels), probs), result, atol=ATOL)
    # Exactly the sklearn AUC of the grid-rounded scores.
    rounded, _ = quantize(probs, metric.num_thresholds)
    exact_rounded = [roc_auc_score(labels == c, rounded[:, c]) for c in range(3)]
    np.testing.assert_allclose(result, exact_rounded, atol=ATOL)

    names = list(metric.per_class())
    assert names == ["covid", "pneumonia", "normal"]
    np.testing.assert_allclose(list(metric.per_class().values()), result, atol=1e-7)
    offline = auc_per_class(labels, probs, ["covid", "pneumonia", "normal"])
    np.testing.assert_allclose(list(offline.values()), expected, atol=1e-12)
    assert auc_per_class(one_hot(labels), probs) == pytest.approx(dict(zip("012", expected)))


def test_auc_coarse_grid_error_bound():
    labels, probs = random_classification(seed=4, n=300)
    num_thresholds = 21
    result = run_metric(ClasswiseAUC(3, num_thresholds=num_thresholds), labels, probs)
    _, bins = quantize(probs, num_thresholds)
    for c in range(3):
        pos, neg = labels == c, labels != c
        same_bin = bins[pos, c][:, None] == bins[neg, c][None, :]
        distinct = probs[pos, c][:, None] != probs[neg, c][None, :]
        bound = 0.5 * np.mean(same_bin & distinct)
        error = abs(result[c] - roc_auc_score(pos, probs[:, c]))
        assert 0 < bound and error <= bound + ATOL


def test_auc_hand_cases_and_weights():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = one_hot(labels) * 0.8 + 0.1
    np.testing.assert_allclose(run_metric(ClasswiseAUC(3), labels, perfect), [1, 1, 1], atol=ATOL)
    np.testing.assert_allclose(run_metric(ClasswiseAUC(3), labels, 1 - perfect), [0, 0, 0], atol=ATOL)
    constant = np.full((6, 3), 1 / 3, "float32")
    np.testing.assert_allclose(run_metric(ClasswiseAUC(3), labels, constant), [0.5] * 3, atol=ATOL)

    # A class with no positives (or a single class present): 0 in the metric, NaN offline.
    only_zero = np.zeros(6, int)
    result = run_metric(ClasswiseAUC(3), only_zero, perfect)
    np.testing.assert_array_equal(result, [0, 0, 0])
    assert all(np.isnan(v) for v in auc_per_class(only_zero, perfect).values())

    labels, probs = random_classification(seed=6, ties=True)
    weights = np.random.default_rng(6).random(len(labels)).astype("float32")
    expected = [roc_auc_score(labels == c, probs[:, c], sample_weight=weights) for c in range(3)]
    np.testing.assert_allclose(run_metric(ClasswiseAUC(3), labels, probs, weights), expected, atol=ATOL)
    offline = auc_per_class(labels, probs, sample_weight=weights)
    np.testing.assert_allclose(list(offline.values()), expected, atol=1e-12)

    with pytest.raises(ValueError):
        ClasswiseAUC(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="score columns"):
        ClasswiseAUC(4).update_state(labels, probs)


# --------------------------------------------------------------------------- #
# Serialization and Keras integration
# --------------------------------------------------------------------------- #


ALL_METRICS = [
    lambda: Dice(threshold=0.4, empty_score=None, name="dice_04"),
    lambda: IoU(empty_score=0.0),
    lambda: SensitivityAtSpecificity(0.99, class_id=2, num_thresholds=501, name="s99"),
    lambda: ClasswiseAUC(3, class_names=["a", "b", "c"], num_thresholds=301),
]


@pytest.mark.parametrize("make", ALL_METRICS)
def test_config_round_trip(make):
    metric = make()
    clone = type(metric).from_config(metric.get_config())
    assert clone.get_config() == metric.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert type(restored) is type(metric)
    assert restored.get_config() == metric.get_config()
    assert keras.saving.get_registered_name(type(metric)).startswith("caaxr_tf>")


def segmentation_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid"),
        ]
    )


def classification_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])


def compile_segmentation(model):
    model.compile(loss="binary_crossentropy", metrics=[Dice(), IoU(empty_score=None)])
    return model


def compile_classification(model):
    model.compile(
        loss="sparse_categorical_crossentropy",
        metrics=[
            SensitivityAtSpecificity(0.99),
            SensitivityAtSpecificity(0.9, class_id=1, name="sens_90_b"),
            ClasswiseAUC(3),
        ],
    )
    return model


def test_model_evaluate_and_reload(tmp_path):
    y_true, x = random_masks(seed=2, n=16)
    seg = compile_segmentation(segmentation_model())
    logs = seg.evaluate(x, y_true, batch_size=5, verbose=0, return_dict=True)
    pred = seg.predict(x, batch_size=5, verbose=0)
    assert logs["dice"] == pytest.approx(dice_per_image(y_true, pred).mean(), abs=ATOL)
    expected_iou = np.nanmean(iou_per_image(y_true, pred, empty_score=None))
    assert logs["iou"] == pytest.approx(expected_iou, abs=ATOL)

    labels, probs = random_classification(seed=7, n=200)
    clf = compile_classification(classification_model())
    logs = clf.evaluate(probs, labels, batch_size=32, verbose=0, return_dict=True)
    pred = clf.predict(probs, batch_size=32, verbose=0)
    rounded, _ = quantize(pred, 10001)
    expected_99 = ref_sens_at_spec(labels == 0, rounded[:, 0], 0.99)
    expected_90 = ref_sens_at_spec(labels == 1, rounded[:, 1], 0.9)
    assert logs["sens_at_spec_0.99"] == pytest.approx(expected_99, abs=ATOL)
    assert logs["sens_90_b"] == pytest.approx(expected_90, abs=ATOL)
    expected_auc = [roc_auc_score(labels == c, pred[:, c]) for c in range(3)]
    np.testing.assert_allclose(logs["classwise_auc"], expected_auc, atol=1e-3)

    path = tmp_path / "clf.keras"
    clf.save(path)
    reloaded = keras.models.load_model(path)
    again = reloaded.evaluate(probs, labels, batch_size=32, verbose=0, return_dict=True)
    assert set(again) == set(logs)
    for key in logs:
        np.testing.assert_allclose(again[key], logs[key], atol=ATOL)


# --------------------------------------------------------------------------- #
# tf.distribute
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def strategy():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices (see conftest.py)")
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def test_distributed_custom_loop_matches_single_device(strategy):
    y_true, y_pred = random_masks(seed=3, n=22)
    mask_weights = np.random.default_rng(3).random(len(y_true)).astype("float32")
    labels, probs = random_classification(seed=8, n=250)
    class_weights = np.random.default_rng(8).random(len(labels)).astype("float32")
    cases = [
        (Dice, (y_true, y_pred, mask_weights)),
        (IoU, (y_true, y_pred, mask_weights)),
        (lambda: SensitivityAtSpecificity(0.9, class_id=1), (labels, probs, class_weights)),
        (lambda: ClasswiseAUC(3), (one_hot(labels), probs, class_weights)),
    ]
    for make, data in cases:
        single = run_metric(make(), *data)
        with strategy.scope():
            metric = make()
        # Batch 6 (or 40) with a ragged last batch: replicas get unequal shares.
        batch = 6 if len(data[0]) == 22 else 40
        dataset = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(data).batch(batch)
        )

        @tf.function
        def step(y, p, w, metric=metric):
            strategy.run(metric.update_state, args=(y, p), kwargs={"sample_weight": w})

        for _ in range(2):  # the second pass checks reset_state under the strategy
            metric.reset_state()
            for y, p, w in dataset:
                step(y, p, w)
            np.testing.assert_allclose(keras.ops.convert_to_numpy(metric.result()), single, atol=ATOL)

        # Each replica really held part of the data.
        first = metric.variables[0]
        local = [np.asarray(v) for v in strategy.experimental_local_results(first.value)]
        assert len(local) == 2 and all(np.any(part != 0) for part in local)
        np.testing.assert_allclose(sum(local), np.asarray(first.numpy()), atol=ATOL)


def test_distributed_model_evaluate_matches_single_device(strategy):
    y_true, x = random_masks(seed=4, n=18)
    labels, probs = random_classification(seed=9, n=150)
    for build, compile_fn, inputs, targets in [
        (segmentation_model, compile_segmentation, x, y_true),
        (classification_model, compile_classification, probs, labels),
    ]:
        single = compile_fn(build()).evaluate(inputs, targets, batch_size=8, verbose=0, return_dict=True)
        with strategy.scope():
            model = compile_fn(build())
        distributed = model.evaluate(inputs, targets, batch_size=8, verbose=0, return_dict=True)
        assert set(distributed) == set(single)
        for key in single:
            if key != "loss":
                np.testing.assert_allclose(distributed[key], single[key], atol=ATOL, err_msg=key)
