"""Patient-clustered bootstrap, DeLong, calibration, temperature scaling and slices
(caaxr_tf.metrics.uncertainty / delong / calibration / slices) against independent references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm, rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from caaxr_tf.metrics.calibration import (
    apply_temperature,
    brier_per_class,
    brier_score,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    logits_from_probabilities,
    negative_log_likelihood,
    reliability_bins,
)
from caaxr_tf.metrics.delong import delong_covariance, delong_interval, delong_per_class, delong_test
from caaxr_tf.metrics.slices import MISSING, age_bands, slice_metrics
from caaxr_tf.metrics.uncertainty import (
    bootstrap,
    flatten,
    format_interval,
    paired_bootstrap,
    resample_indices,
)


def auc(y, s):
    """Mann-Whitney AUC with midranks (fast; checked against roc_auc_score below)."""
    y = np.asarray(y) > 0.5
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - m * (m + 1) / 2) / (m * n))


def test_reference_auc():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), np.round(rng.random(200), 1)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def simulated(n_pos, n_neg, shift, rng):
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    s = np.r_[rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)]
    return y, s


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_covers_true_auc_at_about_nominal_rate():
    # Binormal model: true AUC = Phi(shift / sqrt(2)). 200 data sets x 500 resamples, 95 %
    # percentile intervals; percentile intervals of the AUC undercover slightly at n = 60, so the
    # tolerance is [0.88, 0.99] (binomial sd of the rate at 200 sets: 0.015).
    rng = np.random.default_rng(2024)
    shift = 1.0
    true_auc = norm.cdf(shift / math.sqrt(2))
    covered = 0
    for k in range(200):
        y, s = simulated(30, 30, shift, rng)
        interval = bootstrap(auc, y, s, n_resamples=500, seed=k)[""]
        covered += interval.low <= true_auc <= interval.high
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_unique_patients_give_the_image_bootstrap():
    rng = np.random.default_rng(0)
    y, s = simulated(40, 60, 1.0, rng)
    by_image = bootstrap(auc, y, s, n_resamples=300, seed=7)[""]
    by_patient = bootstrap(auc, y, s, groups=[f"p{i}" for i in range(100)], n_resamples=300, seed=7)[""]
    # patients are numbered in order of first appearance: one image each is the image bootstrap
    ordered = bootstrap(auc, y, s, groups=np.arange(100), n_resamples=300, seed=7)[""]
    assert by_image == ordered == by_patient


def test_duplicated_patient_images_widen_the_interval_only_when_clustered():
    rng = np.random.default_rng(1)
    y, s = simulated(40, 60, 1.0, rng)
    copies = 4
    y4, s4 = np.repeat(y, copies), np.repeat(s, copies)
    patients = np.repeat(np.arange(100), copies)
    base = bootstrap(auc, y, s, n_resamples=400, seed=3)[""]
    naive = bootstrap(auc, y4, s4, n_resamples=400, seed=3)[""]
    clustered = bootstrap(auc, y4, s4, groups=patients, n_resamples=400, seed=3)[""]
    width = lambda i: i.high - i.low  # noqa: E731
    assert width(naive) < 0.7 * width(base)  # images as if independent: too narrow
    assert width(clustered) > 1.5 * width(naive)
    assert abs(width(clustered) - width(base)) < 0.25 * width(base)


def test_resample_keeps_all_images_of_a_drawn_patient():
    groups = np.array(["a", "b", "b", "c", "c", "c"])
    for index in resample_indices(groups, 6, 50, seed=0):
        drawn = groups[index]
        for patient, size in (("a", 1), ("b", 2), ("c", 3)):
            assert np.sum(drawn == patient) % size == 0
        assert len(index) >= 3


def test_undefined_resamples_are_skipped_and_counted():
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    s = np.linspace(0, 1, 8)
    result = bootstrap(auc, y, s, n_resamples=200, seed=0)[""]
    assert 0 < result.n_used < 200  # resamples without the one positive are left out

    def raising(yt, ys):
        if yt.sum() == 0:
            raise ValueError("one class")
        return {"m": float(ys.mean()), "nested": {"x": 1.0}}

    out = bootstrap(raising, y, s, n_resamples=100, seed=0)
    assert set(out) == {"m", "nested/x"} and out["m"].n_used == out["nested/x"].n_used < 100


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(5)
    y, s = simulated(20, 20, 0.5, rng)
    assert bootstrap(auc, y, s, n_resamples=100, seed=11) == bootstrap(auc, y, s, n_resamples=100, seed=11)
    assert bootstrap(auc, y, s, n_resamples=100, seed=11) != bootstrap(auc, y, s, n_resamples=100, seed=12)


def test_format_and_flatten():
    assert format_interval(0.9123, 0.8711, 0.9479) == "0.912 [0.871, 0.948]"
    assert format_interval(float("nan"), None, 0.5) == "n/a [n/a, 0.500]"
    flat = flatten({"a": 1, "b": {"c": 2.0, "d": [1]}})
    assert flat == {"a": 1.0, "b/c": 2.0}


# --------------------------------------------------------------------------- DeLong


def structural_components(y, scores):
    """O(m n) DeLong (1988): psi over all positive/negative pairs, covariance of V10 / V01."""
    y = np.asarray(y) > 0.5
    k = scores.shape[0]
    aucs, v10, v01 = [], [], []
    for r in range(k):
        x, z = scores[r][y], scores[r][~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    cov = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    return np.array(aucs), np.atleast_2d(cov)


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_matches_structural_components(ties):
    rng = np.random.default_rng(3)
    y = rng.random(150) < 0.4
    a = rng.normal(size=150) + y
    b = 0.6 * a + rng.normal(size=150) * 0.8 + 0.5 * y
    c = rng.normal(size=150)
    scores = np.vstack([a, b, c])
    if ties:
        scores = np.round(scores, 1)
    aucs, cov = delong_covariance(y, scores)
    ref_aucs, ref_cov = structural_components(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-9, rtol=0)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-9, rtol=0)
    np.testing.assert_allclose(aucs, [roc_auc_score(y, s) for s in scores], atol=1e-12)


def test_delong_test_and_paired_bootstrap_agree_roughly():
    rng = np.random.default_rng(4)
    y = rng.random(300) < 0.5
    a = rng.normal(size=300) + 1.2 * y
    b = 0.5 * a + rng.normal(size=300) * 0.9 + 0.3 * y
    test = delong_test(y, a, b)
    _, cov = structural_components(y, np.vstack([a, b]))
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert test["se"] == pytest.approx(se, abs=1e-9)
    assert test["p_value"] == pytest.approx(2 * norm.sf(abs(test["difference"]) / se), abs=1e-12)
    paired = paired_bootstrap(auc, y, a, b, n_resamples=1000, seed=0)[""]
    assert paired["difference"] == pytest.approx(test["difference"], abs=1e-12)
    assert paired["low"] == pytest.approx(test["low"], abs=0.02)
    assert paired["high"] == pytest.approx(test["high"], abs=0.02)
    assert (paired["p_value"] < 0.05) == (test["p_value"] < 0.05)


def test_delong_identical_models_and_per_class():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(3), 90)
    same = delong_test(labels == 0, probs[:, 0], probs[:, 0])
    assert same["difference"] == 0 and same["p_value"] == 1.0
    other = rng.dirichlet(np.ones(3), 90)
    per_class = delong_per_class(labels, probs, other, ["a", "b", "c"])
    for index, name in enumerate("abc"):
        assert per_class[name]["auc_a"] == pytest.approx(roc_auc_score(labels == index, probs[:, index]))
    missing = delong_per_class(np.zeros(90, int), probs, other, ["a", "b", "c"])
    assert "error" in missing["a"]
    one = delong_interval(labels == 0, probs[:, 0])
    assert one["low"] <= one["auc"] <= one["high"]
    with pytest.raises(ValueError, match="positives and negatives"):
        delong_test(np.zeros(5), np.arange(5), np.arange(5))


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_bins_match_sklearn_calibration_curve(strategy):
    rng = np.random.default_rng(8)
    prob = rng.beta(2, 3, 500)
    prob[:5] = [0.0, 1.0, 0.5, 0.1, 0.3]  # bin edges included
    y = (rng.random(500) < prob ** 1.5).astype(int)
    bins = reliability_bins(y, prob, 10, strategy)
    prob_true, prob_pred = calibration_curve(y, prob, n_bins=10, strategy=strategy)
    count = np.array(bins["count"])
    np.testing.assert_allclose(np.array(bins["fraction_positive"])[count > 0], prob_true, atol=1e-12)
    np.testing.assert_allclose(np.array(bins["mean_predicted"])[count > 0], prob_pred, atol=1e-12)
    # ECE from sklearn's bins, weighted by the bin counts
    ids = np.searchsorted(np.array(bins["edges"])[1:-1], prob)
    weights = np.bincount(ids, minlength=10)[count > 0] / len(prob)
    assert expected_calibration_error(y, prob, 10, strategy) == pytest.approx(
        float(np.sum(weights * np.abs(prob_true - prob_pred))), abs=1e-12)


def test_perfect_calibration_has_small_ece_and_brier_matches_sklearn():
    rng = np.random.default_rng(9)
    prob = rng.random(20000)
    y = (rng.random(20000) < prob).astype(int)
    assert expected_calibration_error(y, prob) < 0.02
    assert expected_calibration_error(y, np.clip(prob * 0.5 + 0.5, 0, 1)) > 0.2
    probs2 = np.c_[1 - prob, prob]
    assert brier_per_class(y, probs2, ["n", "p"])["p"] == pytest.approx(brier_score_loss(y, prob), abs=1e-12)
    assert brier_score(y, probs2) == pytest.approx(2 * brier_score_loss(y, prob), abs=1e-12)


def test_top_label_report():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 0])
    report = calibration_report(labels, probs, ["a", "b"], n_bins=10)
    # top-label: confidences 0.9 (right), 0.8 (right), 0.6 (wrong), 0.7 (wrong)
    assert report["ece"] == pytest.approx((0.1 + 0.2 + 0.6 + 0.7) / 4)
    assert report["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.3])))


def test_temperature_scaling_fixes_an_overconfident_model_and_keeps_argmax():
    rng = np.random.default_rng(10)
    n, c = 2000, 4
    true_logits = rng.normal(size=(n, c)) * 1.5
    labels = np.array([rng.choice(c, p=p) for p in apply_temperature(true_logits, 1.0)])
    overconfident = true_logits * 3.0  # the right order, 3x too sharp
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    assert negative_log_likelihood(overconfident, labels, t) < negative_log_likelihood(overconfident, labels) - 0.1
    scaled = apply_temperature(overconfident, t)
    np.testing.assert_array_equal(np.argmax(scaled, 1), np.argmax(overconfident, 1))
    # from probabilities only: log p as logits, the same temperature
    probs = apply_temperature(overconfident, 1.0)
    assert fit_temperature(logits_from_probabilities(probs), labels) == pytest.approx(t, rel=1e-3)
    before = calibration_report(labels, probs, list("abcd"))["ece"]
    after = calibration_report(labels, scaled, list("abcd"))["ece"]
    assert after < before


# --------------------------------------------------------------------------- slices


def test_slices_match_pandas_groupby():
    rng = np.random.default_rng(11)
    n = 400
    frame = pd.DataFrame({
        "y": rng.integers(0, 2, n), "s": rng.random(n),
        "sex": rng.choice(["F", "M", ""], n, p=[0.45, 0.45, 0.1]),
        "view": rng.choice(["pa", "ap", "ll"], n, p=[0.6, 0.37, 0.03]),
        "patient": [f"p{i // 2}" for i in range(n)],
    })
    frame["s"] = np.clip(frame["s"] + 0.3 * frame["y"], 0, 1)
    rows = slice_metrics(auc, frame["y"].to_numpy(), frame["s"].to_numpy(), frame, ["sex", "view"],
                         groups=frame["patient"], min_n=20, n_resamples=50)
    frame["sex"] = frame["sex"].replace("", MISSING)
    for column in ("sex", "view"):
        expected = frame.groupby(column).apply(lambda g: pd.Series(
            {"n": len(g), "n_patients": g["patient"].nunique(), "auc": auc(g["y"].to_numpy(), g["s"].to_numpy())}),
            include_groups=False)
        got = {r["value"]: r for r in rows if r["column"] == column}
        assert set(got) == set(expected.index)
        for value, ref in expected.iterrows():
            assert got[value]["n"] == ref["n"] and got[value]["n_patients"] == ref["n_patients"]
            if ref["n"] < 20:
                assert not got[value]["scored"] and "fewer than 20" in got[value]["reason"]
            else:
                cell = got[value]["metrics"][""]
                assert cell["estimate"] == pytest.approx(ref["auc"], abs=1e-12)
                assert cell["low"] <= cell["estimate"] <= cell["high"]


def test_age_bands():
    assert age_bands([5, 39.9, 40, 59, 60, 80, 95, "", None, "x"]) == [
        "<40", "<40", "40-59", "40-59", "60-79", ">=80", ">=80", MISSING, MISSING, MISSING]
