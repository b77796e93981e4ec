"""Score a trained run on another source's data: class matching and the shortcut gap.

A run predicts its own classes (``run_classes``); the other shards label images with theirs
(``data_classes``). Names match when equal after `normalize_class_name` (case, and ``_``,
``-`` and spaces as one separator, are ignored). Where names differ, a class map renames
classes: ``--class-map other_pneumonia=non_covid,no_finding=non_covid``. Each ``OLD=NEW``
renames the class ``OLD`` of either list to ``NEW``, so the same map serves both directions:

* a 2-class run (covid, non_covid) on 3-class data (covid, other_pneumonia, no_finding): the
  two data classes become ``non_covid``; their images count as ``non_covid``;
* a 3-class run on 2-class data: the run's two classes merge; the score of ``non_covid`` is
  the sum of their probabilities.

The evaluated classes are the run's classes after renaming, in the run's order, merged ones
once. Every data class must land on one of them, else `ClassMatchError` names the classes
that cannot be matched. A run class without data keeps its column (its AUC is undefined).

The shortcut gap of a run is its internal AUC (its own test split) minus its external AUC
(another source): a large gap says the model learnt something of its own source.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

_SEPARATORS = re.compile(r"[\s_\-]+")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")


class ClassMatchError(ValueError):
    """The classes of a run and of the data to score it on cannot be matched."""


def normalize_class_name(name: str) -> str:
    """Lower case, runs of ``_``, ``-`` and whitespace -> one ``_``, trimmed:
    ``"Non-Covid"``, ``"non covid"`` and ``"non__covid"`` -> ``"non_covid"``."""
    return _SEPARATORS.sub("_", str(name).strip().lower()).strip("_")


def parse_class_map(text: str | None) -> dict[str, str]:
    """``"old=new,old2=new2"`` -> ``{"old": "new", ...}`` (names as written, trimmed).

    Raises ``ValueError`` naming the entry for an empty entry, a missing ``=``, an empty
    or invalid name, or a class mapped twice to different names (after normalisation).
    """
    if text is None or not str(text).strip():
        return {}
    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}
    for position, entry in enumerate(str(text).split(","), start=1):
        where = f"--class-map entry {position} ({entry.strip()!r})"
        if not entry.strip():
            raise ValueError(f"{where}: empty entry; expected OLD=NEW[,OLD=NEW...]")
        if entry.count("=") != 1:
            raise ValueError(f"{where}: expected exactly one '=' as in OLD=NEW")
        old, new = (part.strip() for part in entry.split("="))
        for side, name in (("OLD", old), ("NEW", new)):
            if not name:
                raise ValueError(f"{where}: {side} class name is empty")
            if not _NAME.match(name):
                raise ValueError(
                    f"{where}: {side} class name {name!r} may hold letters, digits, space, "
                    "'_', '-' and '.' only"
                )
        key = normalize_class_name(old)
        if key in seen and normalize_class_name(seen[key]) != normalize_class_name(new):
            raise ValueError(f"{where}: {old!r} is already mapped to {seen[key]!r}")
        seen[key] = new
        mapping[old] = new
    return mapping


@dataclass(frozen=True)
class ClassMatch:
    """How a run's outputs and another data set's labels map onto the evaluated classes.

    Attributes:
        class_names: the evaluated classes (run order, after renaming).
        run_classes: the run's classes, as given.
        data_classes: the data's classes, as given.
        run_to_eval: for every run class, the index of its evaluated class.
        data_to_eval: for every data class, the index of its evaluated class.
        class_map: the renaming that was applied.
    """

    class_names: tuple[str, ...]
    run_classes: tuple[str, ...]
    data_classes: tuple[str, ...]
    run_to_eval: tuple[int, ...]
    data_to_eval: tuple[int, ...]
    class_map: Mapping[str, str]

    def map_labels(self, labels) -> np.ndarray:
        """Data class indices [N] -> evaluated class indices [N]."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.data_classes)):
            raise ValueError(
                f"labels must be in 0..{len(self.data_classes) - 1} ({', '.join(self.data_classes)}), "
                f"got {labels.min()}..{labels.max()}"
            )
        return np.asarray(self.data_to_eval, dtype=np.int64)[labels]

    def map_scores(self, scores) -> np.ndarray:
        """Run probabilities [N, run classes] -> [N, evaluated classes]; merged classes add up."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[1] != len(self.run_classes):
            raise ValueError(
                f"scores must be [N, {len(self.run_classes)}] ({', '.join(self.run_classes)}), "
                f"got shape {scores.shape}"
            )
        merged = np.zeros((scores.shape[0], len(self.class_names)), dtype=np.float64)
        for run_index, eval_index in enumerate(self.run_to_eval):
            merged[:, eval_index] += scores[:, run_index]
        return merged

    def as_dict(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "run_classes": {name: self.class_names[i] for name, i in zip(self.run_classes, self.run_to_eval)},
            "data_classes": {name: self.class_names[i] for name, i in zip(self.data_classes, self.data_to_eval)},
            "class_map": dict(self.class_map),
        }


def match_classes(
    run_classes: Sequence[str],
    data_classes: Sequence[str],
    class_map: Mapping[str, str] | str | None = None,
) -> ClassMatch:
    """Match a run's classes with another data set's (see module doc).

    Args:
        run_classes: the classes the run predicts, in output order.
        data_classes: the classes of the data to score it on, in label order.
        class_map: ``{old: new}`` or the ``"old=new,..."`` text of ``--class-map``.

    Raises:
        ClassMatchError: a data class matches no run class, a class-map name is in
            neither list, or a list names a class twice.
    """
    if isinstance(class_map, str) or class_map is None:
        class_map = parse_class_map(class_map)
    run_classes = tuple(str(c) for c in run_classes)
    data_classes = tuple(str(c) for c in data_classes)
    for what, names in (("run", run_classes), ("data", data_classes)):
        keys = [normalize_class_name(n) for n in names]
        duplicated = sorted({n for n, k in zip(names, keys) if keys.count(k) > 1})
        if duplicated:
            raise ClassMatchError(f"the {what} classes name the same class twice: {duplicated}")
    renames = {normalize_class_name(old): new for old, new in class_map.items()}
    known = {normalize_class_name(n) for n in run_classes + data_classes}
    unused = [old for old in class_map if normalize_class_name(old) not in known]
    if unused:
        raise ClassMatchError(
            f"--class-map names {unused}, which are neither run classes {list(run_classes)} "
            f"nor data classes {list(data_classes)}"
        )

    def renamed(name: str) -> str:
        return renames.get(normalize_class_name(name), name)

    class_names: list[str] = []
    keys: list[str] = []
    run_to_eval = []
    for name in run_classes:
        target = renamed(name)
        key = normalize_class_name(target)
        if key not in keys:
            keys.append(key)
            class_names.append(target)
        run_to_eval.append(keys.index(key))

    data_to_eval = []
    unmatched = []
    for name in data_classes:
        key = normalize_class_name(renamed(name))
        if key in keys:
            data_to_eval.append(keys.index(key))
        else:
            unmatched.append(name)
    if unmatched:
        hint = ",".join(f"{name}=<run class>" for name in unmatched)
        raise ClassMatchError(
            f"cannot match data classes {unmatched} to the run's classes {list(run_classes)}"
            + (f" (renamed: {class_names})" if class_map else "")
            + f"; add --class-map {hint}"
        )
    return ClassMatch(
        class_names=tuple(class_names),
        run_classes=run_classes,
        data_classes=data_classes,
        run_to_eval=tuple(run_to_eval),
        data_to_eval=tuple(data_to_eval),
        class_map=dict(class_map),
    )


def external_metrics(labels, scores, match: ClassMatch) -> dict[str, Any]:
    """``caaxr_tf.evaluate.classification_metrics`` on the evaluated classes, plus the match.

    Args:
        labels: [N] data class indices of the other shards.
        scores: [N, run classes] the run's probabilities on those images.
    """
    from caaxr_tf.metrics import classification_metrics

    result = classification_metrics(match.map_labels(labels), match.map_scores(scores), match.class_names)
    result["class_match"] = match.as_dict()
    return result


def covid_auc(labels, scores, class_names: Sequence[str]) -> float:
    """One-vs-rest ROC AUC of the COVID class (``evaluate.covid_index``); NaN without both
    classes among the labels."""
    from sklearn.metrics import roc_auc_score

    from caaxr_tf.metrics import covid_index

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    index = covid_index(class_names)
    positive = labels == index
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, np.asarray(scores)[:, index]))


def shortcut_gap(internal_auc: float, external_auc: float) -> dict[str, float]:
    """``{"internal_auc", "external_auc", "gap"}`` with gap = internal - external (NaN if either is)."""
    internal, external = float(internal_auc), float(external_auc)
    gap = internal - external if math.isfinite(internal) and math.isfinite(external) else math.nan
    return {"internal_auc": internal, "external_auc": external, "gap": gap}


def summarize_shortcut_gaps(per_fold: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Mean and sample standard deviation over folds of internal AUC, external AUC and gap.

    Folds with an undefined value are left out of that value's statistics (``count`` says
    how many were used); the gap uses the folds where both AUCs are defined.
    """
    rows = [shortcut_gap(internal, external) for internal, external in per_fold]
    summary: dict[str, Any] = {"folds": rows}
    for key in ("internal_auc", "external_auc", "gap"):
        values = np.array([row[key] for row in rows if math.isfinite(row[key])], dtype=np.float64)
        summary[key] = {
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
            "count": int(values.size),
        }
    return summary
