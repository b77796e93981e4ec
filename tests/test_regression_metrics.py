"""Regression metrics per target, Keras (also under tf.distribute) and the exact NumPy scores, against scikit-learn and SciPy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from caaxr_tf.metrics.regression import PearsonR, TargetColumn, regression_metrics

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)

TARGETS = ("geographic_extent", "opacity")
BATCHES = (7, 1, 16, 5)  # uneven batches, one of a single example


def severity_like(seed: int, n: int = 29) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.stack([rng.uniform(0, 8, n), rng.uniform(0, 6, n)], axis=1)
    predicted = truth * [0.7, 0.5] + rng.normal(0, 1.0, (n, 2)) + [1.0, 1.2]
    return truth.astype("float32"), predicted.astype("float32")


def update_in_batches(metric, truth, predicted, weights=None):
    start = 0
    for size in BATCHES:
        stop = start + size
        w = None if weights is None else weights[start:stop]
        metric.update_state(truth[start:stop], predicted[start:stop], sample_weight=w)
        start = stop
    assert start == len(truth)
    return keras.ops.convert_to_numpy(metric.result())


def reference(truth, predicted, column):
    y, p = truth[:, column].astype(np.float64), predicted[:, column].astype(np.float64)
    return {
        "mae": mean_absolute_error(y, p),
        "mse": mean_squared_error(y, p),
        "r2": r2_score(y, p),
        "pearson_r": pearsonr(y, p)[0],
    }


def test_pearson_r_over_batches_matches_scipy():
    truth, predicted = severity_like(0)
    per_column = update_in_batches(PearsonR(class_aggregation=None), truth, predicted)
    expected = [pearsonr(truth[:, c], predicted[:, c])[0] for c in range(2)]
    np.testing.assert_allclose(per_column, expected, atol=1e-6)
    averaged = update_in_batches(PearsonR(), truth, predicted)
    assert float(averaged) == pytest.approx(np.mean(expected), abs=1e-6)
    single = update_in_batches(PearsonR(), truth[:, 0], predicted[:, 0])  # [N] inputs
    assert float(single) == pytest.approx(expected[0], abs=1e-6)


def test_pearson_r_weights_and_degenerate_input():
    truth, predicted = severity_like(1)
    weights = np.random.default_rng(1).uniform(0.1, 3.0, len(truth)).astype("float32")
    result = update_in_batches(PearsonR(class_aggregation=None), truth, predicted, weights)
    for column in range(2):
        covariance = np.cov(truth[:, column], predicted[:, column], aweights=weights)
        expected = covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1])
        assert result[column] == pytest.approx(expected, abs=1e-6)
    # integer weights equal repeated examples
    repeats = np.array([1, 0, 2, 1] * 7 + [3])
    counted = update_in_batches(PearsonR(class_aggregation=None), truth, predicted, repeats.astype("float32"))
    expanded = [pearsonr(np.repeat(truth[:, c], repeats), np.repeat(predicted[:, c], repeats))[0] for c in range(2)]
    np.testing.assert_allclose(counted, expanded, atol=1e-6)

    constant = PearsonR()
    constant.update_state(truth, np.full_like(truth, 3.0))
    assert float(constant.result()) == 0.0
    assert float(PearsonR().result()) == 0.0  # nothing seen yet
    constant.reset_state()
    constant.update_state(truth, predicted)
    assert float(constant.result()) == pytest.approx(np.mean([pearsonr(truth[:, c], predicted[:, c])[0] for c in range(2)]), abs=1e-6)
    with pytest.raises(ValueError, match="class_aggregation"):
        PearsonR(class_aggregation="variance_weighted_average")


def test_per_target_metrics_match_sklearn_over_batches():
    truth, predicted = severity_like(2)
    metrics = regression_metrics(TARGETS)
    assert [m.name for m in metrics] == [
        f"{t}_{m}" for t in TARGETS for m in ("mae", "mse", "r2", "pearson_r")
    ]
    values = {m.name: float(update_in_batches(m, truth, predicted)) for m in metrics}
    for column, target in enumerate(TARGETS):
        for name, expected in reference(truth, predicted, column).items():
            assert values[f"{target}_{name}"] == pytest.approx(expected, rel=1e-5, abs=1e-5), (target, name)
    # the two targets really are scored apart
    assert values["geographic_extent_mae"] != pytest.approx(values["opacity_mae"], rel=1e-3)


def test_target_column_serialization_and_bounds():
    metric = TargetColumn(PearsonR(class_aggregation=None), 1, name="opacity_pearson_r")
    restored = TargetColumn.from_config(metric.get_config())
    assert restored.name == "opacity_pearson_r" and restored.index == 1
    assert isinstance(restored.metric, PearsonR) and restored.metric.class_aggregation is None
    truth, predicted = severity_like(3)
    result = update_in_batches(restored, truth, predicted)
    assert result.shape == (1,)  # one column, not aggregated
    assert result[0] == pytest.approx(pearsonr(truth[:, 1], predicted[:, 1])[0], abs=1e-6)
    with pytest.raises(ValueError, match="column 2 of a 2-column"):
        TargetColumn(keras.metrics.MeanAbsoluteError(), 2).update_state(truth, predicted)


def test_metrics_in_compile_evaluate_and_saved_model(tmp_path):
    truth, predicted = severity_like(4, n=40)
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.compile(loss="mse", metrics=regression_metrics(TARGETS))
    logs = model.evaluate(predicted, truth, batch_size=9, verbose=0, return_dict=True)
    for column, target in enumerate(TARGETS):
        for name, expected in reference(truth, predicted, column).items():
            assert logs[f"{target}_{name}"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    path = tmp_path / "identity.keras"
    model.save(path)
    again = keras.models.load_model(path).evaluate(predicted, truth, batch_size=9, verbose=0, return_dict=True)
    for key, value in logs.items():
        assert again[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def strategy():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices (see conftest.py)")
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def test_distributed_custom_loop_matches_sklearn(strategy):
    truth, predicted = severity_like(5, n=45)
    with strategy.scope():  # the four kinds of metric, on the second column (the slow part is tracing)
        metrics = [m for m in regression_metrics(TARGETS) if m.name.startswith("opacity")]
    # batch 8 of 45 examples: the last batch is ragged, replicas get unequal shares
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((truth, predicted)).batch(8))

    @tf.function
    def step(y, p):
        def replica(y, p):
            for metric in metrics:
                metric.update_state(y, p)

        strategy.run(replica, args=(y, p))

    for _ in range(2):  # the second pass checks reset_state under the strategy
        for metric in metrics:
            metric.reset_state()
        for y, p in dataset:
            step(y, p)
        values = {m.name: float(m.result()) for m in metrics}
        assert len(values) == 4
        for name, expected in reference(truth, predicted, 1).items():
            assert values[f"opacity_{name}"] == pytest.approx(expected, rel=1e-5, abs=1e-5), name

    pearson = next(m for m in metrics if m.name == "opacity_pearson_r")
    local = [np.asarray(v) for v in strategy.experimental_local_results(pearson.metric.weight.value)]
    assert len(local) == 2 and all(part.sum() > 0 for part in local)
    assert sum(part.sum() for part in local) == 45


def test_numpy_regression_scores_and_pearson_r_equal_scipy_and_sklearn():
    """The exact NumPy scores (offline evaluation, baselines) against independent constructions,
    on data where the usual slips give other numbers: the prediction's mean differs from the
    truth's (an R² centred on the wrong mean), both means are far from 0 (an uncentred r) and
    the residuals are not all 0 or 1 in size (a squared-error MAE)."""
    from caaxr_tf.metrics.regression import pearson_r, regression_scores

    truth, predicted = severity_like(6, n=31)
    for column in range(2):
        y, p = truth[:, column].astype(np.float64), predicted[:, column].astype(np.float64)
        scores = regression_scores(y, p)
        assert set(scores) == {"mae", "mse", "r2", "pearson_r"}
        residual = y - p
        r2_by_hand = 1.0 - np.sum(residual ** 2) / (len(y) * np.var(y))
        # float64 NumPy against float64 scikit-learn/SciPy on 31 numbers: equal to a few ulps
        assert scores["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-12)
        assert scores["mse"] == pytest.approx(mean_squared_error(y, p), rel=1e-12)
        assert scores["r2"] == pytest.approx(r2_score(y, p), rel=1e-12)
        assert scores["r2"] == pytest.approx(r2_by_hand, rel=1e-12)
        assert scores["pearson_r"] == pytest.approx(pearsonr(y, p)[0], rel=1e-12)
        assert pearson_r(y, p) == pytest.approx(np.corrcoef(y, p)[0, 1], rel=1e-12)
        assert pearson_r(p, y) == pytest.approx(pearson_r(y, p), rel=1e-12)

        # the data tell the wrong formulas apart from the right ones (by far more than the tolerance)
        assert abs(np.mean(residual ** 2) - scores["mae"]) > 0.1
        wrong_r2 = 1.0 - np.sum(residual ** 2) / np.sum((y - p.mean()) ** 2)
        assert abs(wrong_r2 - scores["r2"]) > 0.01
        uncentred = np.sum(y * p) / np.sqrt(np.sum(y * y) * np.sum(p * p))
        assert abs(uncentred - scores["pearson_r"]) > 0.01

    # a shifted copy: r is 1 (centred), R² falls by shift² / var(y), MAE is the shift exactly
    y = truth[:, 0].astype(np.float64)
    shifted = regression_scores(y, y + 2.0)
    assert shifted["pearson_r"] == pytest.approx(1.0, rel=1e-12)
    assert shifted["mae"] == pytest.approx(2.0, rel=1e-12) and shifted["mse"] == pytest.approx(4.0, rel=1e-12)
    assert shifted["r2"] == pytest.approx(1.0 - 4.0 / np.var(y), rel=1e-12)
    # undefined scores are NaN: constant truth (R²), constant prediction (r)
    assert np.isnan(regression_scores(np.full(5, 2.0), np.arange(5.0))["r2"])
    assert np.isnan(regression_scores(np.arange(5.0), np.full(5, 3.0))["pearson_r"])
