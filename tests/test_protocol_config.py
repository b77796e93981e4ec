"""Strict loading of caaxr_tf/configs/protocols.yaml: unknown keys, rules, sources; per-protocol settings."""

from __future__ import annotations

import pytest

from caaxr_tf.config import ConfigError, apply_overrides, load_config
from caaxr_tf.data import protocols as P
from caaxr_tf.data.records import Box, Sample


def load(*overrides: str) -> dict[str, dict[str, P.ProtocolSpec]]:
    return P.load_protocol_sets(apply_overrides(load_config("protocols"), overrides))


def test_available_protocols_by_source_set():
    assert P.available_protocols() == {
        "caaxr": ["seg", "2class", "3class", "4class", "infection"],
        "covid-chestxray": ["seg", "2class", "3class", "severity", "lungs"],
        "qata": ["infection"],
        "covid-ctset": ["ct"],
    }


def test_the_new_protocols():
    sets = P.load_protocol_sets()
    severity = sets["covid-chestxray"]["severity"]
    assert (severity.task, severity.targets, severity.sources, severity.folds) == (
        "regression", ("geographic_extent", "opacity"), ["covid-chestxray-severity"], 50)
    lungs = sets["covid-chestxray"]["lungs"]
    assert (lungs.task, lungs.sources, lungs.targets) == ("segmentation", ["covid-chestxray-lungs"], ())
    qata = sets["qata"]["infection"]
    assert (qata.task, qata.class_names, qata.folds, qata.num_parts) == ("infection", ["covid", "control"], 5, 5)
    infection = sets["caaxr"]["infection"]
    assert (infection.task, infection.sources, infection.folds) == ("infection", ["caaxr", "chexpert"], 5)
    assert infection.box_findings == ("consolidation", "ground glass opacity")
    ct = sets["covid-ctset"]["ct"]
    assert (ct.task, ct.class_names, ct.folds, ct.storage_size) == ("ct", ["covid", "normal"], 5, 0)
    assert [c.params for c in ct.classes] == [{"label": "slice_covid", "value": 1.0}, {"label": "slice_covid", "value": 0.0}]


@pytest.mark.parametrize(
    "override, message",
    [
        ("caaxr.seg.clases={}", "unknown key 'clases' in caaxr.seg (did you mean 'classes'?); valid keys: box_findings, "
                                "classes, splits, storage_size, subsets, target_ranges, targets, task"),
        ("caaxr.2class.classes.covid.cuont=3", "unknown key 'cuont' in caaxr.2class.classes.covid (did you mean 'count'?); "
                                               "valid keys: count, findings, label, rule, source, value"),
        ("splits.fold=3", "unknown key 'fold' in splits (did you mean 'folds'?); valid keys: folds, scheme, "
                          "test_fraction, val_fraction"),
        ("qata.infection.splits.val=0.2", "unknown key 'val' in qata.infection.splits"),
        ("caaxr.seg.subsets.consolidation.finding=[x]", "unknown key 'finding' in caaxr.seg.subsets.consolidation"),
        ("caaxr.2class.classes.covid.source=nih", "caaxr.2class.classes.covid.source: unknown source 'nih'; known "
                                                  "sources: caaxr, chexpert, covid-chestxray, covid-chestxray-lungs, "
                                                  "covid-chestxray-severity, covid-ctset, qata"),
        ("caaxr.2class.classes.covid.rule=nonsense", "caaxr.2class.classes.covid: unknown rule 'nonsense'; known rules: any, "),
        ("caaxr.2class.classes.covid.findings=[x]", "caaxr.2class.classes.covid.findings: the rule 'any' does not use it "
                                                    "(it takes no parameters)"),
        ("covid-ctset.ct.classes.covid.label=null", "covid-ctset.ct.classes.covid: the rule 'label_is' needs 'label'"),
        ("caaxr.2class.classes.covid.count=0", "caaxr.2class.classes.covid.count must be an integer >= 1, got 0"),
        ("covid-chestxray.severity.targets=[opacity, opacity]", "covid-chestxray.severity.targets: expected distinct"),
        ("qata.infection.splits.folds=6", "folds must be between 1 and 5, got 6"),
        ("covid-ctset.ct.storage_size=-1", "covid-ctset.ct.storage_size must be an integer >= 0, got -1"),
        ("qata.infection.classes={}", "qata.infection.classes: a protocol needs at least one class"),
    ],
)
def test_protocols_yaml_is_strict(override, message):
    with pytest.raises(ConfigError) as caught:
        load(override)
    assert message in str(caught.value)


def test_a_protocol_overrides_some_split_keys_and_folds_override_all():
    sets = load("splits.val_fraction=0.05", "qata.infection.splits.test_fraction=0.3")
    assert (sets["caaxr"]["seg"].val_fraction, sets["caaxr"]["seg"].num_parts) == (0.05, 10)
    qata = sets["qata"]["infection"]
    assert (qata.test_fraction, qata.val_fraction, qata.folds, qata.num_parts) == (0.3, 0.05, 5, 14)
    assert P.with_folds(qata, 3).folds == 3
    with pytest.raises(ConfigError, match="folds must be between 1 and 5, got 6"):
        P.with_folds(P.load_protocols("covid-ctset")["ct"], 6)


def test_payload_of_a_protocol_without_the_new_fields_is_unchanged():
    """The build fingerprint of an existing protocol: the fields it had, and only those."""
    seg = P.load_protocols("caaxr")["seg"]
    assert list(seg.payload()) == ["name", "source", "task", "classes", "subsets", "test_fraction", "val_fraction", "folds"]
    assert seg.payload()["classes"][0] == {"name": "lesion", "source": "caaxr", "rule": "has_boxes", "count": 1656,
                                           "params": {}}
    ct = P.load_protocols("covid-ctset")["ct"]
    assert ct.payload()["storage_size"] == 0 and "targets" not in ct.payload()
    assert P.load_protocols("covid-chestxray")["severity"].payload()["targets"] == ("geographic_extent", "opacity")


def test_box_findings_decide_the_class_rules_and_label_is():
    spec = P.load_protocols("caaxr")["infection"]
    boxes = (Box(0, 0, 2, 2, "Nodule"), Box(1, 1, 3, 3, "Ground glass opacity"))
    infected = Sample("a", "p1", "bimcv", "/a.png", boxes=boxes)
    nodule_only = Sample("b", "p2", "bimcv", "/b.png", boxes=boxes[:1])
    control = Sample("c", "p3", "chexpert", "/c.jpg", labels={"No Finding": 1.0})
    members, excluded = P.classify(spec, {"caaxr": [infected, nodule_only], "chexpert": [control]})
    assert {k: [s.image_id for s in v] for k, v in members.items()} == {"covid": ["a"], "control": ["c"]}
    assert members["covid"][0].boxes == boxes  # the members keep every box; the writer filters them
    assert dict(excluded) == {"caaxr: matches no class": 1}
    assert P.keep_box_findings(infected, spec.box_findings).boxes == boxes[1:]
    assert P.keep_box_findings(infected, ()).boxes == boxes

    ct = P.load_protocols("covid-ctset")["ct"]
    slices = [Sample(f"s{v}", "p", "covid-ctset", "/s.tif", labels=labels)
              for v, labels in enumerate([{"slice_covid": 1.0}, {"slice_covid": 0.0}, {"patient_covid": 1.0}])]
    members, excluded = P.classify(ct, {"covid-ctset": slices})
    assert {k: [s.image_id for s in v] for k, v in members.items()} == {"covid": ["s0"], "normal": ["s1"]}
    assert dict(excluded) == {"covid-ctset: matches no class": 1}
