"""Protocol definitions, class rules and the grouped, stratified split."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from caaxr_tf.config import apply_overrides, load_config
from caaxr_tf.data import protocols as P
from caaxr_tf.data.records import Sample


def chexpert(image_id: str, patient: str = "p1", **labels: float) -> Sample:
    names = {k.replace("_", " "): v for k, v in labels.items()}
    return Sample(image_id, patient, "chexpert", f"/x/{image_id}.jpg", labels=names)


def test_caaxr_protocols_have_the_paper_classes_and_counts():
    specs = P.load_protocols("caaxr")
    assert list(specs) == ["seg", "2class", "3class", "4class", "infection"]
    assert {c.name: c.count for c in specs["seg"].classes} == {"lesion": 1656}
    assert {c.name: c.count for c in specs["2class"].classes} == {"covid": 2388, "non_covid": 2412}
    assert sum(c.count for c in specs["3class"].classes if c.source == "chexpert") == 4812
    assert sum(c.count for c in specs["4class"].classes if c.source == "chexpert") == 7212
    assert specs["4class"].class_names == ["covid", "pneumonia", "other_unhealthy", "healthy"]
    assert specs["seg"].num_parts == 5 and specs["seg"].folds == 2
    assert "consolidation" in specs["seg"].subsets


def test_unknown_rule_and_bad_folds_are_rejected():
    config = load_config("protocols")
    bad_rule = apply_overrides(config, ["caaxr.2class.classes.covid.rule=nonsense"])
    with pytest.raises(ValueError, match="unknown rule 'nonsense'"):
        P.load_protocols("caaxr", bad_rule)
    with pytest.raises(ValueError, match="folds must be between 1 and 5"):
        P.load_protocols("caaxr", apply_overrides(config, ["splits.folds=6"]))
    with pytest.raises(ValueError, match="unknown source"):
        P.load_protocols("nih", config)


@pytest.mark.parametrize(
    "labels, expected",
    [
        ({"No_Finding": 1.0}, {"healthy": True, "unhealthy": False, "pneumonia": False, "other_unhealthy": False}),
        ({"Pneumonia": 1.0, "Edema": 1.0}, {"healthy": False, "unhealthy": True, "pneumonia": True, "other_unhealthy": False}),
        ({"Edema": 1.0, "Pneumonia": 0.0}, {"healthy": False, "unhealthy": True, "pneumonia": False, "other_unhealthy": True}),
        ({"Pneumonia": -1.0}, {"healthy": False, "unhealthy": None, "pneumonia": None, "other_unhealthy": None}),
        ({"Pneumonia": -1.0, "Edema": 1.0}, {"healthy": False, "unhealthy": True, "pneumonia": None, "other_unhealthy": None}),
        ({"Support_Devices": 1.0}, {"healthy": False, "unhealthy": False, "pneumonia": False, "other_unhealthy": False}),
        ({"No_Finding": 1.0, "Edema": 1.0}, {"healthy": None, "unhealthy": True, "pneumonia": False, "other_unhealthy": True}),
    ],
)
def test_chexpert_rules(labels, expected):
    sample = chexpert("a", **labels)
    got = {rule: P.RULES[rule](sample, {}) for rule in expected}
    assert got == expected


def test_classify_first_match_wins_and_counts_exclusions():
    spec = P.load_protocols("caaxr")["4class"]
    samples = [
        chexpert("h", No_Finding=1.0),
        chexpert("p", Pneumonia=1.0),
        chexpert("o", Cardiomegaly=1.0),
        chexpert("u", Pneumonia=-1.0),
        chexpert("s", Support_Devices=1.0),
    ]
    covid = [Sample("c", "s1", "bimcv", "/c.png", labels={"COVID-19": 1.0})]
    members, excluded = P.classify(spec, {"chexpert": samples, "caaxr": covid})
    assert {k: [s.image_id for s in v] for k, v in members.items()} == {
        "covid": ["c"], "pneumonia": ["p"], "other_unhealthy": ["o"], "healthy": ["h"]
    }
    assert excluded == Counter({"chexpert: uncertain label decides the class": 1, "chexpert: matches no class": 1})


def test_covid_chestxray_rules():
    spec = P.load_protocols("covid-chestxray")["3class"]

    def cxr(image_id, *findings):
        return Sample(image_id, image_id, "covid-chestxray", f"/{image_id}", findings=findings)

    samples = [cxr("a", "COVID-19"), cxr("b", "COVID-19", "ARDS"), cxr("c", "No Finding"), cxr("d", "Streptococcus"),
               cxr("e", "ARDS"), cxr("f", "Pneumonia", "Viral", "SARS")]
    members, excluded = P.classify(spec, {"covid-chestxray": samples})
    assert {k: [s.image_id for s in v] for k, v in members.items()} == {
        "covid": ["a", "b"], "other_pneumonia": ["d", "f"], "no_finding": ["c"]
    }
    assert sum(excluded.values()) == 1


def test_candidate_order_is_seeded_and_stable():
    samples = [chexpert(f"img{i:03d}") for i in range(50)]
    first = [s.image_id for s in P.candidate_order(samples, 0, "caaxr", "2class", "non_covid")]
    again = [s.image_id for s in P.candidate_order(list(reversed(samples)), 0, "caaxr", "2class", "non_covid")]
    other = [s.image_id for s in P.candidate_order(samples, 1, "caaxr", "2class", "non_covid")]
    assert first == again
    assert first != other and sorted(first) == sorted(other)


def make_items(num_patients: int, seed: int) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    items = []
    for p in range(num_patients):
        cls = "a" if p % 3 else "b"
        for k in range(int(rng.integers(1, 4))):
            items.append((f"p{p}_i{k}", f"p{p}", cls))
    return items


def test_assign_parts_groups_patients_and_meets_the_fractions():
    items = make_items(400, seed=3)
    parts = P.assign_parts(items, ["a", "b"], 0.5, 5, seed=0)
    assert set(parts) == {i for i, _, _ in items}
    by_patient = defaultdict(set)
    for image_id, patient, _ in items:
        by_patient[patient].add(parts[image_id])
    assert all(len(p) == 1 for p in by_patient.values())  # no patient in two parts

    totals = Counter(c for _, _, c in items)
    for cls, total in totals.items():
        in_part = Counter(parts[i] for i, _, c in items if c == cls)
        assert abs(in_part[0] - 0.5 * total) <= 3
        for part in range(1, 6):
            assert abs(in_part[part] - 0.1 * total) <= 3


def test_assign_parts_is_exact_for_single_image_patients_and_deterministic():
    items = [(f"i{k}", f"p{k}", "a" if k < 60 else "b") for k in range(100)]
    parts = P.assign_parts(items, ["a", "b"], 0.5, 5, seed=7)
    counts = Counter((parts[i], c) for i, _, c in items)
    for part, share in [(0, 0.5)] + [(k, 0.1) for k in range(1, 6)]:
        assert counts[(part, "a")] == math.floor(60 * share + 0.5)
        assert counts[(part, "b")] == math.floor(40 * share + 0.5)
    assert parts == P.assign_parts(list(reversed(items)), ["a", "b"], 0.5, 5, seed=7)
    assert parts != P.assign_parts(items, ["a", "b"], 0.5, 5, seed=8)


def test_split_of_folds():
    assert [P.split_of(part, 1) for part in range(6)] == ["test", "val", "train", "train", "train", "train"]
    assert [P.split_of(part, 2) for part in range(6)] == ["test", "train", "val", "train", "train", "train"]


def test_in_subset_is_case_insensitive():
    subset = {"findings": ["consolidation", "ground glass opacity"]}
    assert P.in_subset(["Ground glass opacity", "Nodule"], subset)
    assert not P.in_subset(["Nodule"], subset)
    assert not P.in_subset([], subset)
