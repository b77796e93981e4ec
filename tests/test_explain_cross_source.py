"""Cross-source evaluation: matched, mapped and unmatched classes; the shortcut gap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from caaxr_tf.explain.cross_source import (
    ClassMatchError,
    covid_auc,
    external_metrics,
    match_classes,
    normalize_class_name,
    parse_class_map,
    shortcut_gap,
    summarize_shortcut_gaps,
)

TWO = ["covid", "non_covid"]
THREE = ["covid", "other_pneumonia", "no_finding"]


def test_names_match_ignoring_case_and_separators():
    assert {normalize_class_name(n) for n in ["Non-Covid", "non covid", " non__covid ", "NON_COVID"]} == {
        "non_covid"
    }
    match = match_classes(["COVID", "Non-Covid"], ["non covid", "covid"])
    assert match.class_names == ("COVID", "Non-Covid")
    assert match.run_to_eval == (0, 1) and match.data_to_eval == (1, 0)
    np.testing.assert_array_equal(match.map_labels([0, 1, 1, 0]), [1, 0, 0, 1])
    scores = np.array([[0.9, 0.1], [0.3, 0.7]])
    np.testing.assert_array_equal(match.map_scores(scores), scores)


def test_several_data_classes_map_to_one_run_class():
    match = match_classes(TWO, THREE, "other_pneumonia=non_covid, no_finding=non_covid")
    assert match.class_names == ("covid", "non_covid")
    assert match.data_to_eval == (0, 1, 1)
    np.testing.assert_array_equal(match.map_labels([2, 0, 1, 2]), [1, 0, 1, 1])
    assert match.as_dict()["data_classes"] == {
        "covid": "covid", "other_pneumonia": "non_covid", "no_finding": "non_covid"
    }


def test_several_run_classes_merge_with_summed_scores():
    match = match_classes(THREE, TWO, "other_pneumonia=non_covid,no_finding=non_covid")
    assert match.class_names == ("covid", "non_covid") and match.run_to_eval == (0, 1, 1)
    scores = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    np.testing.assert_allclose(match.map_scores(scores), [[0.6, 0.4], [0.2, 0.8]])


def test_unmatched_classes_are_named():
    with pytest.raises(ClassMatchError) as caught:
        match_classes(TWO, THREE)
    message = str(caught.value)
    assert "['other_pneumonia', 'no_finding']" in message and "['covid', 'non_covid']" in message
    assert "--class-map other_pneumonia=<run class>,no_finding=<run class>" in message
    with pytest.raises(ClassMatchError, match=r"cannot match data classes \['no_finding'\]"):
        match_classes(TWO, THREE, "other_pneumonia=non_covid")
    with pytest.raises(ClassMatchError, match=r"names \['pneumonia'\], which are neither"):
        match_classes(TWO, THREE, "pneumonia=non_covid")
    with pytest.raises(ClassMatchError, match="same class twice"):
        match_classes(["covid", "Covid"], TWO)
    # A run class without data stays (its AUC is undefined); nothing to map.
    match = match_classes(THREE, ["covid", "no finding"])
    assert match.class_names == tuple(THREE) and match.data_to_eval == (0, 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a=b,", "entry 2 .*empty entry"),
        ("a", "exactly one '='"),
        ("a=b=c", "exactly one '='"),
        ("=b", "OLD class name is empty"),
        ("a= ", "NEW class name is empty"),
        ("a=b;c", "letters, digits"),
        ("a=b,A=c", "'A' is already mapped to 'b'"),
    ],
)
def test_class_map_syntax_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_class_map(text)


def test_class_map_parse():
    assert parse_class_map(None) == {} and parse_class_map("  ") == {}
    assert parse_class_map(" no finding = non_covid ,x=y") == {"no finding": "non_covid", "x": "y"}
    assert parse_class_map("a=b,a=b") == {"a": "b"}  # a repeated identical entry is harmless


def test_external_metrics_against_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)  # THREE data classes
    scores = rng.dirichlet([1, 1], 60)  # a TWO-class run
    scores[labels == 0, 0] += 0.3
    scores /= scores.sum(axis=1, keepdims=True)
    match = match_classes(TWO, THREE, "other_pneumonia=non_covid,no_finding=non_covid")
    metrics = external_metrics(labels, scores, match)
    expected = roc_auc_score(labels == 0, scores[:, 0])
    assert metrics["auc_per_class"]["covid"] == pytest.approx(expected)
    assert metrics["class_counts"] == {"covid": int((labels == 0).sum()), "non_covid": int((labels != 0).sum())}
    assert metrics["class_match"]["class_map"] == {"other_pneumonia": "non_covid", "no_finding": "non_covid"}
    assert covid_auc(match.map_labels(labels), scores, match.class_names) == pytest.approx(expected)
    assert math.isnan(covid_auc(np.zeros(5), np.full((5, 2), 0.5), TWO))


def test_shortcut_gap_summary():
    assert shortcut_gap(0.95, 0.70) == pytest.approx({"internal_auc": 0.95, "external_auc": 0.70, "gap": 0.25})
    assert math.isnan(shortcut_gap(0.9, float("nan"))["gap"])
    summary = summarize_shortcut_gaps([(0.9, 0.6), (0.8, 0.7), (0.85, float("nan"))])
    assert summary["internal_auc"]["mean"] == pytest.approx(0.85)
    assert summary["internal_auc"]["std"] == pytest.approx(np.std([0.9, 0.8, 0.85], ddof=1))
    assert summary["external_auc"] == pytest.approx({"mean": 0.65, "std": np.std([0.6, 0.7], ddof=1), "count": 2})
    assert summary["gap"]["mean"] == pytest.approx(0.2) and summary["gap"]["count"] == 2
    assert len(summary["folds"]) == 3
