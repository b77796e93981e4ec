"""The evaluation protocols: which images form each class, and the grouped, stratified splits.

A protocol (``caaxr_tf/configs/protocols.yaml``, under its source set) lists its classes; each class
takes the samples of one registered source that satisfy a rule (e.g. CheXpert ``healthy``).
Splits put ``test_fraction`` of every class in a fixed test set and cut the rest into parts of
``val_fraction``; fold k validates on part k and trains on the remaining parts. A patient never
appears in two parts.

protocols.yaml is loaded strictly into `ProtocolSpec`s: an unknown key anywhere is a
``ConfigError`` naming the valid keys, and a class whose ``source`` is not a registered source
(``caaxr_tf.data.sources``) or whose ``rule`` is not in ``RULES`` is an error listing the known
ones. The protocol ``task`` is a name only here: the task registry checks it where a run starts.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

from caaxr_tf.config import ConfigError, from_mapping, load_config
from caaxr_tf.data.records import Sample
from caaxr_tf.data.sources.chexpert import OBSERVATIONS as CHEXPERT_OBSERVATIONS
from caaxr_tf.data.grouped_splits import grouped_half_split, patient_key
from caaxr_tf.data.sources import available_sources

SPLITS_KEY = "splits"

# Observations that make an image "unhealthy"; support devices alone do not.
CHEXPERT_PATHOLOGIES = tuple(o for o in CHEXPERT_OBSERVATIONS if o not in ("No Finding", "Support Devices"))


PARTS = "parts"
GROUPED_HALVES = "grouped_halves"
SPLIT_SCHEMES = (PARTS, GROUPED_HALVES)


@dataclass(frozen=True)
class SplitsConfig:
    """The ``splits`` block (global, or a protocol's override of some of its keys).

    ``scheme``: ``parts`` (a fixed test set, folds over validation-sized parts of the rest) or
    ``grouped_halves`` (Cohen et al. 2020: fold k is the random half split by patient with
    seed k - 1; the test half holds ceil(G / 2) of the G patients; ``val_fraction`` of the
    training half's patients validate; ``test_fraction`` is not used).
    """

    test_fraction: float = field(default=0.5, metadata={"gt": 0.0, "finite": True})
    val_fraction: float = field(default=0.1, metadata={"gt": 0.0, "finite": True})
    folds: int = field(default=2, metadata={"min": 1})
    scheme: Literal["parts", "grouped_halves"] = PARTS


@dataclass(frozen=True)
class ClassConfig:
    """One class as protocols.yaml writes it: a source, a rule, a target count (null: every
    matching image) and the parameters its rule takes (see ``RULE_PARAMETERS``)."""

    source: str
    rule: str
    count: int | None = field(default=None, metadata={"min": 1})
    findings: tuple[str, ...] | None = None
    label: str | None = None
    value: float | None = field(default=None, metadata={"finite": True})


@dataclass(frozen=True)
class SubsetConfig:
    """A named subset of the test images: those with a box of one of ``findings``."""

    findings: tuple[str, ...]


@dataclass(frozen=True)
class ProtocolConfig:
    """One protocol as protocols.yaml writes it (``classes`` and ``subsets`` are checked entry
    by entry; ``splits`` overrides keys of the global ``splits`` block)."""

    classes: dict
    task: str = "classification"
    subsets: dict = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    target_ranges: dict = field(default_factory=dict)
    box_findings: tuple[str, ...] = ()
    storage_size: int | None = field(default=None, metadata={"min": 0})
    splits: dict | None = None


@dataclass(frozen=True)
class ClassSpec:
    name: str
    source: str
    rule: str
    count: int | None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProtocolSpec:
    """A loaded protocol.

    Attributes:
        name: the protocol's name (``seg``, ``2class``, ``infection``...).
        source: the source set it belongs to (``--source`` of make_tfrecords).
        task: the task name written to summary.json.
        classes: in label order.
        subsets: named test subsets by box finding (``{"consolidation": {"findings": [...]}}``).
        test_fraction, val_fraction, folds: the splits (global block, then the protocol's own).
        targets: float targets taken from ``Sample.labels[name]`` (regression), written to
            each record's ``targets`` feature and listed as ``target_names`` in summary.json.
        box_findings: only boxes with one of these findings count (case-insensitive): for the
            class rules and in the records; empty: every box.
        storage_size: the records' longest side for this protocol (0: the original size),
            overriding ``--storage-size``; None: ``--storage-size``.
        target_ranges: ``{target: (low, high)}``, the valid range of some ``targets``
            (summary.json ``target_ranges``; exported regression models clamp to it).
        split_scheme: ``parts`` or ``grouped_halves`` (see `SplitsConfig`).
    """

    name: str
    source: str
    task: str
    classes: tuple[ClassSpec, ...]
    subsets: Mapping[str, Mapping[str, Any]]
    test_fraction: float
    val_fraction: float
    folds: int
    targets: tuple[str, ...] = ()
    box_findings: tuple[str, ...] = ()
    storage_size: int | None = None
    target_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    split_scheme: str = PARTS

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

    def payload(self) -> dict[str, Any]:
        """The protocol as the build fingerprint records it: every field, except the optional
        ones at their defaults (so a protocol that does not use them fingerprints as before)."""
        data = dataclasses.asdict(self)
        for item in dataclasses.fields(self):
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            if item.name in _OPTIONAL_FIELDS and data[item.name] == default:
                del data[item.name]
        return data


_OPTIONAL_FIELDS = ("targets", "box_findings", "storage_size", "target_ranges", "split_scheme")


def _splits(global_splits: SplitsConfig, override: Mapping[str, Any] | None, where: str) -> SplitsConfig:
    if not override:
        return global_splits
    return from_mapping(SplitsConfig, {**dataclasses.asdict(global_splits), **_mapping(override, where)}, where)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def _class_spec(name: str, body: Any, where: str) -> ClassSpec:
    config = from_mapping(ClassConfig, _mapping(body, where), where)
    if config.rule not in RULES:
        raise ConfigError(f"{where}: unknown rule {config.rule!r}; known rules: {', '.join(RULES)}")
    sources = available_sources()
    if config.source not in sources:
        raise ConfigError(f"{where}.source: unknown source {config.source!r}; known sources: {', '.join(sources)}")
    takes = RULE_PARAMETERS.get(config.rule, ())
    params: dict[str, Any] = {}
    for parameter in ("findings", "label", "value"):
        value = getattr(config, parameter)
        if value is None:
            if parameter in takes:
                raise ConfigError(f"{where}: the rule {config.rule!r} needs {parameter!r}")
            continue
        if parameter not in takes:
            taken = f"it takes {', '.join(takes)}" if takes else "it takes no parameters"
            raise ConfigError(f"{where}.{parameter}: the rule {config.rule!r} does not use it ({taken})")
        params[parameter] = list(value) if isinstance(value, tuple) else value
    return ClassSpec(name=str(name), source=config.source, rule=config.rule, count=config.count, params=params)


def _protocol_spec(source_set: str, name: str, body: Any, global_splits: SplitsConfig) -> ProtocolSpec:
    where = f"{source_set}.{name}"
    config = from_mapping(ProtocolConfig, _mapping(body, where), where)
    classes = tuple(_class_spec(class_name, class_body, f"{where}.classes.{class_name}")
                    for class_name, class_body in _mapping(config.classes, f"{where}.classes").items())
    if not classes:
        raise ConfigError(f"{where}.classes: a protocol needs at least one class")
    subsets = {}
    for subset_name, subset_body in _mapping(config.subsets, f"{where}.subsets").items():
        subset = from_mapping(SubsetConfig, subset_body, f"{where}.subsets.{subset_name}")
        subsets[str(subset_name)] = {"findings": list(subset.findings)}
    if len(set(config.targets)) != len(config.targets) or not all(config.targets):
        raise ConfigError(f"{where}.targets: expected distinct, non-empty names, got {list(config.targets)}")
    target_ranges = _target_ranges(config.target_ranges, config.targets, f"{where}.target_ranges")
    splits = _splits(global_splits, config.splits, f"{where}.splits")
    if splits.scheme == GROUPED_HALVES:
        if not 0.0 < splits.val_fraction < 1.0:
            raise ConfigError(f"{where}.splits.val_fraction: the share of the training half that validates "
                              f"must lie strictly between 0 and 1, got {splits.val_fraction}")
    else:
        _check_fractions(splits.test_fraction, splits.val_fraction)
    spec = ProtocolSpec(
        name=str(name),
        source=source_set,
        task=config.task,
        classes=classes,
        subsets=subsets,
        test_fraction=splits.test_fraction,
        val_fraction=splits.val_fraction,
        folds=splits.folds,
        targets=tuple(config.targets),
        box_findings=tuple(str(f).strip().lower() for f in config.box_findings),
        storage_size=config.storage_size,
        target_ranges=target_ranges,
        split_scheme=splits.scheme,
    )
    return with_folds(spec, spec.folds)


def _target_ranges(body: Any, targets: Sequence[str], where: str) -> dict[str, tuple[float, float]]:
    """``{target: [low, high]}`` checked: known targets, finite numbers, low < high."""
    ranges: dict[str, tuple[float, float]] = {}
    for name, bounds in _mapping(body, where).items():
        if name not in targets:
            raise ConfigError(f"{where}.{name}: not one of the protocol's targets {list(targets)}")
        if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
            raise ConfigError(f"{where}.{name}: expected [low, high], got {bounds!r}")
        low, high = float(bounds[0]), float(bounds[1])
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"{where}.{name}: expected finite low < high, got {bounds!r}")
        ranges[str(name)] = (low, high)
    return ranges


def _check_fractions(test_fraction: float, val_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0 or not 0.0 < val_fraction <= 1.0 - test_fraction:
        raise ConfigError(f"bad split fractions: test {test_fraction}, val {val_fraction}")


def with_folds(spec: ProtocolSpec, folds: int) -> ProtocolSpec:
    """``spec`` with ``folds`` folds (e.g. ``--folds``); between 1 and its number of parts
    (any number >= 1 for grouped half splits: fold k is the split with seed k - 1)."""
    most = 1_000_000 if spec.split_scheme == GROUPED_HALVES else spec.num_parts
    if isinstance(folds, bool) or not isinstance(folds, int) or not 1 <= folds <= most:
        raise ConfigError(f"folds must be between 1 and {most}, got {folds}")
    return dataclasses.replace(spec, folds=folds)


def load_protocol_sets(config: Mapping[str, Any] | None = None) -> dict[str, dict[str, ProtocolSpec]]:
    """Every protocol of protocols.yaml (or of ``config``), by source set, checked strictly."""
    config = load_config("protocols") if config is None else config
    global_splits = from_mapping(SplitsConfig, config.get(SPLITS_KEY), SPLITS_KEY)
    _check_fractions(global_splits.test_fraction, global_splits.val_fraction)
    sets: dict[str, dict[str, ProtocolSpec]] = {}
    for source_set, protocols in config.items():
        if source_set == SPLITS_KEY:
            continue
        protocols = _mapping(protocols, str(source_set))
        sets[str(source_set)] = {
            str(name): _protocol_spec(str(source_set), str(name), body, global_splits)
            for name, body in protocols.items()
        }
    return sets


def available_protocols(config: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """``{source set: [protocol names]}`` of protocols.yaml (or of ``config``), in file order."""
    return {source_set: list(specs) for source_set, specs in load_protocol_sets(config).items()}


def load_protocols(source: str = "caaxr", config: Mapping[str, Any] | None = None) -> dict[str, ProtocolSpec]:
    """The protocols of one source set (``caaxr``, ``covid-chestxray``, ``qata``, ...).

    The whole of protocols.yaml (or ``config``) is checked, not only that set.
    """
    sets = load_protocol_sets(config)
    if source not in sets:
        raise ConfigError(f"unknown source set {source!r}; known: {', '.join(sets)}")
    return sets[source]


def keep_box_findings(sample: Sample, findings: Sequence[str]) -> Sample:
    """``sample`` with only the boxes whose finding is one of ``findings`` (case-insensitive);
    all of them when ``findings`` is empty."""
    if not findings:
        return sample
    wanted = {str(f).strip().lower() for f in findings}
    return sample.replace(boxes=tuple(box for box in sample.boxes if box.finding.strip().lower() in wanted))


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


def _rule_label_is(sample: Sample, params: Mapping[str, Any]) -> bool:
    """The sample's label ``params["label"]`` equals ``params["value"]`` (absent: no)."""
    value = sample.labels.get(str(params["label"]))
    return value is not None and float(value) == float(params["value"])


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
    "label_is": _rule_label_is,
}
# The parameters each rule takes in protocols.yaml (beside source, rule and count).
RULE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "finding_in": ("findings",),
    "label_is": ("label", "value"),
}


def classify(spec: ProtocolSpec, samples_by_source: Mapping[str, Sequence[Sample]]) -> tuple[dict[str, list[Sample]], Counter]:
    """Put each sample into the first class whose rule accepts it.

    The rules see only the protocol's ``box_findings`` boxes; the members keep every box (the
    shard writer filters them). Returns the members of each class (sorted by image id) and the
    counts of samples left out, keyed by reason.
    """
    members: dict[str, list[Sample]] = {c.name: [] for c in spec.classes}
    excluded: Counter = Counter()
    for source in spec.sources:
        classes = [c for c in spec.classes if c.source == source]
        for sample in samples_by_source.get(source, ()):
            undecided = False
            seen = keep_box_findings(sample, spec.box_findings)
            for class_spec in classes:
                verdict = RULES[class_spec.rule](seen, class_spec.params)
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


def assign_half_splits(
    items: Sequence[tuple[str, str, str]], folds: int, val_fraction: float, seed: int, *scope: str
) -> dict[str, list[str]]:
    """The ``grouped_halves`` scheme: per (image_id, patient_id, class), its split in each fold.

    Fold k is `caaxr_tf.severity.splits.grouped_half_split` with seed k - 1 (the published
    evaluation's GroupShuffleSplit halves by patient); of its training half, ``val_fraction``
    of the patients (at least one, drawn with ``stable_seed(seed, *scope, "val", k)``) form the
    validation split. Patients are compared by `caaxr_tf.severity.splits.patient_key` (``"2"``
    and ``"02"`` are one patient). Returns ``{image_id: [split of fold 1, split of fold 2, ...]}``.
    """
    image_ids = [image_id for image_id, _, _ in items]
    patients = [patient_key(patient_id) for _, patient_id, _ in items]
    splits: dict[str, list[str]] = {image_id: [] for image_id in image_ids}
    for fold in range(1, folds + 1):
        half = grouped_half_split(patients, seed=fold - 1)
        train_patients = sorted({patients[i] for i in half.train})
        rng = np.random.default_rng(stable_seed(seed, *scope, "val", fold))
        num_val = min(len(train_patients) - 1, max(1, round(val_fraction * len(train_patients))))
        val_patients = {train_patients[i] for i in rng.permutation(len(train_patients))[:num_val]}
        for i in half.test:
            splits[image_ids[i]].append("test")
        for i in half.train:
            splits[image_ids[i]].append("val" if patients[i] in val_patients else "train")
    return splits
