"""The evaluation protocols: which images form each class, and the grouped, stratified splits.

A protocol (``configs/protocols.yaml``) lists its classes; each class takes the samples of one
source that satisfy a rule (e.g. CheXpert ``healthy``). Splits put ``test_fraction`` of every
class in a fixed test set and cut the rest into parts of ``val_fraction``; fold k validates on
part k and trains on the remaining parts. A patient never appears in two parts.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from caaxr_tf.config import load_config
from caaxr_tf.data.chexpert import OBSERVATIONS as CHEXPERT_OBSERVATIONS
from caaxr_tf.data.records import Sample

PROTOCOL_NAMES = ("seg", "2class", "3class", "4class")
SOURCES = ("caaxr", "covid-chestxray")

# Observations that make an image "unhealthy"; support devices alone do not.
CHEXPERT_PATHOLOGIES = tuple(o for o in CHEXPERT_OBSERVATIONS if o not in ("No Finding", "Support Devices"))


@dataclass(frozen=True)
class ClassSpec:
    name: str
    source: str
    rule: str
    count: int | None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    source: str
    task: str
    classes: tuple[ClassSpec, ...]
    subsets: Mapping[str, Mapping[str, Any]]
    test_fraction: float
    val_fraction: float
    folds: int

    @property
    def class_names(self) -> list[str]:
        return [spec.name for spec in self.classes]

    @property
    def num_parts(self) -> int:
        """Validation-sized parts in the non-test half (5 for 50 % test and 10 % val)."""
        return max(1, round((1.0 - self.test_fraction) / self.val_fraction))

    @property
    def sources(self) -> list[str]:
        return sorted({spec.source for spec in self.classes})


def load_protocols(source: str = "caaxr", config: Mapping[str, Any] | None = None) -> dict[str, ProtocolSpec]:
    """Read the protocols of one source (``caaxr`` or ``covid-chestxray``)."""
    config = config if config is not None else load_config("protocols")
    if source not in config:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    splits = config.get("splits", {})
    test_fraction = float(splits.get("test_fraction", 0.5))
    val_fraction = float(splits.get("val_fraction", 0.1))
    folds = int(splits.get("folds", 2))
    if not 0.0 < test_fraction < 1.0 or not 0.0 < val_fraction <= 1.0 - test_fraction:
        raise ValueError(f"bad split fractions: test {test_fraction}, val {val_fraction}")
    protocols = {}
    for name, body in config[source].items():
        classes = []
        for class_name, class_body in body["classes"].items():
            class_body = dict(class_body)
            rule = class_body.pop("rule")
            if rule not in RULES:
                raise ValueError(f"protocol {name}: class {class_name}: unknown rule {rule!r}")
            count = class_body.pop("count", None)
            classes.append(
                ClassSpec(
                    name=class_name,
                    source=class_body.pop("source"),
                    rule=rule,
                    count=None if count is None else int(count),
                    params=class_body,
                )
            )
        spec = ProtocolSpec(
            name=name,
            source=source,
            task=body.get("task", "classification"),
            classes=tuple(classes),
            subsets=body.get("subsets", {}) or {},
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            folds=folds,
        )
        if not 1 <= spec.folds <= spec.num_parts:
            raise ValueError(f"folds must be between 1 and {spec.num_parts}, got {spec.folds}")
        protocols[name] = spec
    return protocols


# --- class rules -------------------------------------------------------------------------
# A rule returns True (the sample belongs to the class), False, or None (undecidable because a
# deciding CheXpert label is uncertain; such samples are left out and counted).

Rule = Callable[[Sample, Mapping[str, Any]], "bool | None"]


def _state(sample: Sample, observation: str) -> float:
    value = sample.labels.get(observation, 0.0)
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _any_state(sample: Sample, observations: Iterable[str]) -> bool | None:
    states = [_state(sample, o) for o in observations]
    if any(s == 1.0 for s in states):
        return True
    if any(s == -1.0 for s in states):
        return None
    return False


def _rule_any(sample: Sample, params: Mapping[str, Any]) -> bool:
    return True


def _rule_has_boxes(sample: Sample, params: Mapping[str, Any]) -> bool:
    return len(sample.boxes) > 0


def _rule_healthy(sample: Sample, params: Mapping[str, Any]) -> bool | None:
    no_finding = _state(sample, "No Finding")
    if no_finding == -1.0:
        return None
    if no_finding != 1.0:
        return False
    # "No Finding" together with a positive pathology is contradictory: leave it out.
    return None if _any_state(sample, CHEXPERT_PATHOLOGIES) else True


def _rule_unhealthy(sample: Sample, params: Mapping[str, Any]) -> bool | None:
    return _any_state(sample, CHEXPERT_PATHOLOGIES)


def _rule_pneumonia(sample: Sample, params: Mapping[str, Any]) -> bool | None:
    state = _state(sample, "Pneumonia")
    return None if state == -1.0 else state == 1.0


def _rule_other_unhealthy(sample: Sample, params: Mapping[str, Any]) -> bool | None:
    pneumonia = _state(sample, "Pneumonia")
    if pneumonia == 1.0:
        return False
    if pneumonia == -1.0:
        return None
    return _any_state(sample, [o for o in CHEXPERT_PATHOLOGIES if o != "Pneumonia"])


def _tokens(sample: Sample) -> set[str]:
    return {f.strip().lower() for f in sample.findings}


def _rule_covid(sample: Sample, params: Mapping[str, Any]) -> bool:
    return "covid-19" in _tokens(sample) or sample.labels.get("COVID-19") == 1.0


def _rule_not_covid(sample: Sample, params: Mapping[str, Any]) -> bool:
    return not _rule_covid(sample, params)


def _rule_no_finding(sample: Sample, params: Mapping[str, Any]) -> bool:
    return _tokens(sample) == {"no finding"}


def _rule_finding_in(sample: Sample, params: Mapping[str, Any]) -> bool:
    wanted = {str(f).strip().lower() for f in params.get("findings", [])}
    return not _rule_covid(sample, params) and bool(_tokens(sample) & wanted)


RULES: dict[str, Rule] = {
    "any": _rule_any,
    "has_boxes": _rule_has_boxes,
    "healthy": _rule_healthy,
    "unhealthy": _rule_unhealthy,
    "pneumonia": _rule_pneumonia,
    "other_unhealthy": _rule_other_unhealthy,
    "covid": _rule_covid,
    "not_covid": _rule_not_covid,
    "no_finding": _rule_no_finding,
    "finding_in": _rule_finding_in,
}


def classify(spec: ProtocolSpec, samples_by_source: Mapping[str, Sequence[Sample]]) -> tuple[dict[str, list[Sample]], Counter]:
    """Put each sample into the first class whose rule accepts it.

    Returns the members of each class (sorted by image id) and the counts of samples left out,
    keyed by reason.
    """
    members: dict[str, list[Sample]] = {c.name: [] for c in spec.classes}
    excluded: Counter = Counter()
    for source in spec.sources:
        classes = [c for c in spec.classes if c.source == source]
        for sample in samples_by_source.get(source, ()):
            undecided = False
            for class_spec in classes:
                verdict = RULES[class_spec.rule](sample, class_spec.params)
                if verdict:
                    members[class_spec.name].append(sample)
                    break
                undecided = undecided or verdict is None
            else:
                reason = "uncertain label decides the class" if undecided else "matches no class"
                excluded[f"{source}: {reason}"] += 1
    for class_name in members:
        members[class_name].sort(key=lambda s: s.image_id)
    return members, excluded


def stable_seed(*parts: object) -> list[int]:
    """A seed sequence derived from strings and ints, the same on every machine and run."""
    return [zlib.crc32(str(part).encode("utf-8")) for part in parts]


def candidate_order(samples: Sequence[Sample], seed: int, *scope: str) -> list[Sample]:
    """A seeded permutation of ``samples`` (sorted by image id first): the order in which images
    are drawn when a class has more than its target."""
    ordered = sorted(samples, key=lambda s: s.image_id)
    rng = np.random.default_rng(stable_seed(seed, *scope))
    return [ordered[i] for i in rng.permutation(len(ordered))]


# --- splits ------------------------------------------------------------------------------


def assign_parts(
    items: Sequence[tuple[str, str, str]],
    class_names: Sequence[str],
    test_fraction: float,
    num_parts: int,
    seed: int,
) -> dict[str, int]:
    """Assign each (image_id, patient_id, class) to a part: 0 is the test set, 1..num_parts the
    validation-sized parts of the rest.

    Patients are placed whole, largest first (ties in a seeded order), each into the part where
    it most reduces the squared distance between the part's class counts and their targets.
    """
    val_fraction = (1.0 - test_fraction) / num_parts
    fractions = np.array([test_fraction] + [val_fraction] * num_parts)
    class_index = {name: i for i, name in enumerate(class_names)}
    by_patient: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for image_id, patient_id, class_name in items:
        by_patient[patient_id].append((image_id, class_index[class_name]))

    totals = np.zeros(len(class_names))
    for members in by_patient.values():
        for _, c in members:
            totals[c] += 1
    targets = fractions[:, None] * totals[None, :]
    current = np.zeros_like(targets)
    scale = np.maximum(totals, 1.0)

    patients = sorted(by_patient)
    rng = np.random.default_rng(stable_seed(seed, "patients"))
    tiebreak = rng.permutation(len(patients))
    order = sorted(range(len(patients)), key=lambda i: (-len(by_patient[patients[i]]), tiebreak[i]))

    assignment: dict[str, int] = {}
    for i in order:
        members = by_patient[patients[i]]
        counts = np.zeros(len(class_names))
        for _, c in members:
            counts[c] += 1
        before = ((current - targets) ** 2 / scale).sum(axis=1)
        after = ((current + counts - targets) ** 2 / scale).sum(axis=1)
        part = int(np.argmin(after - before))
        current[part] += counts
        for image_id, _ in members:
            assignment[image_id] = part
    return assignment


def split_of(part: int, fold: int) -> str:
    """The split (train/val/test) that a part plays in fold ``fold`` (1-based)."""
    if part == 0:
        return "test"
    return "val" if part == fold else "train"


def in_subset(box_findings: Iterable[str], subset: Mapping[str, Any]) -> bool:
    """Whether an image whose boxes carry these findings belongs to a subset such as
    ``consolidation``."""
    wanted = {str(f).strip().lower() for f in subset.get("findings", [])}
    return bool({name.strip().lower() for name in box_findings} & wanted)
