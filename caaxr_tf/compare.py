"""``caaxr compare``: two classifiers on the same test images, with paired statistics.

    caaxr compare RUN_A RUN_B [--bootstrap 2000] [--seed 0] [--out DIR] [--no-plots]
    caaxr compare A.csv B.csv --protocol TFRECORDS/PROTOCOL [--split test --fold 1] ...

A run folder stands for its ``eval/predictions.csv`` (written by ``caaxr evaluate``) and its
``config.yaml``'s protocol folder and fold; files need ``--protocol``. Both are checked as
``caaxr score`` checks a file (`caaxr_tf.scoring.check_classification`, no missing ids
allowed), and both must hold the same image ids: otherwise the error names the ids only in A
and only in B. Both must be scored on the same protocol, split and fold.

Per class, one-vs-rest: DeLong's test of the two AUCs (`caaxr_tf.metrics.delong`; difference,
its 95 % interval, p-value). For every metric of the evaluation (AUCs, macro AUC, sensitivity
at 99 %/90 % specificity, accuracy): the patient-clustered paired bootstrap of A - B
(`caaxr_tf.metrics.uncertainty.paired_bootstrap`). Writes ``compare.json``, ``compare.txt``
and ``roc_compare.png`` to ``--out`` (default ``compare_<A>_vs_<B>/`` in the working folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from caaxr_tf.metrics.delong import delong_per_class
from caaxr_tf.metrics.uncertainty import DEFAULT_RESAMPLES, DEFAULT_SEED, paired_bootstrap
from caaxr_tf.scoring import (
    MAX_LISTED,
    PredictionsError,
    check_classification,
    headline_metrics,
    load_protocol,
    read_predictions,
)


class IdMismatchError(PredictionsError):
    """The two predictions do not cover the same image ids."""


def resolve_input(source: str | Path, protocol: str | Path | None, split: str, fold: int
                  ) -> tuple[Path, Path, str, int]:
    """``(predictions file, protocol folder, split, fold)`` of a run folder or a file."""
    source = Path(source)
    if source.is_dir():
        import yaml

        config_path = source / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: {source} is not a run folder")
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        predictions = source / "eval" / ("predictions.csv" if split == "test" else f"predictions_{split}.csv")
        if not predictions.is_file():
            raise FileNotFoundError(f"{predictions} not found: run caaxr evaluate --run {source} first")
        return predictions, Path(protocol or config["tfrecords"]), split, int(config.get("fold") or 1)
    if protocol is None:
        raise ValueError(f"{source}: a predictions file needs --protocol TFRECORDS/PROTOCOL")
    return source, Path(protocol), split, fold


def compare(source_a: str | Path, source_b: str | Path, *, protocol: str | Path | None = None, split: str = "test",
            fold: int = 1, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
            tolerance: float = 1e-3, out: str | Path | None = None, plots: bool = True, log=print) -> dict[str, Any]:
    """Compare two predictions (run folders or files) on the same images; returns compare.json."""
    from caaxr_tf.io import json_safe, write_json_atomic, write_text_atomic

    file_a, protocol_a, split_a, fold_a = resolve_input(source_a, protocol, split, fold)
    file_b, protocol_b, split_b, fold_b = resolve_input(source_b, protocol, split, fold)
    if (protocol_a.resolve(), fold_a) != (protocol_b.resolve(), fold_b):
        raise ValueError(f"A is scored on {protocol_a} fold {fold_a}, B on {protocol_b} fold {fold_b}: "
                         "not the same test images")
    proto = load_protocol(protocol_a, split_a, fold_a)
    checked = []
    for path in (file_a, file_b):
        columns, records = read_predictions(path)
        # every id present in each file is checked against the split; a missing id is compared below
        checked.append(check_classification(columns, records, proto, tolerance=tolerance, max_missing=1.0,
                                            source=str(path)))
    ids_a, ids_b = set(checked[0].ids), set(checked[1].ids)
    if ids_a != ids_b or checked[0].missing:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        lines = [f"A ({file_a}) and B ({file_b}) do not hold the same image ids"]
        if only_a:
            lines.append(f"only in A ({len(only_a)}): {', '.join(only_a[:MAX_LISTED])}")
        if only_b:
            lines.append(f"only in B ({len(only_b)}): {', '.join(only_b[:MAX_LISTED])}")
        both_missing = sorted(set(checked[0].missing) & set(checked[1].missing))
        if both_missing:
            lines.append(f"in neither ({len(both_missing)}) of the {split_a} split: {', '.join(both_missing[:MAX_LISTED])}")
        raise IdMismatchError("\n  ".join(lines))
    ids = checked[0].ids
    by_id = {r["image_id"]: r for r in proto.rows}
    labels = np.array([int(by_id[i]["label_index"]) for i in ids])
    patients = [by_id[i].get("patient_id") or i for i in ids]
    scores_a, scores_b = checked[0].scores, checked[1].scores
    names = proto.class_names
    result: dict[str, Any] = {
        "a": str(source_a), "b": str(source_b), "predictions_a": str(file_a), "predictions_b": str(file_b),
        "protocol": str(protocol_a), "split": split_a, "fold": fold_a, "num_images": len(ids),
        "num_patients": len(set(patients)),
        "delong": delong_per_class(labels, scores_a, scores_b, names),
        "paired_bootstrap": {"method": "patient-clustered paired bootstrap, percentile; difference = A - B",
                             "seed": seed, **paired_bootstrap(headline_metrics, labels, scores_a, scores_b,
                                                              groups=patients, n_resamples=n_resamples, seed=seed,
                                                              class_names=names)},
    }
    out = Path(out) if out else Path(f"compare_{Path(source_a).stem}_vs_{Path(source_b).stem}")
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": "compare.json", "table": "compare.txt"}
    if plots:
        from caaxr_tf.scoring_plots import plot_roc_band

        files["roc"] = "roc_compare.png"
        plot_roc_band(labels, scores_a, names, out / files["roc"], groups=patients, n_resamples=0,
                      title="ROC: A solid, B dashed", other=scores_b)
    result["files"] = files
    table = format_comparison(result)
    write_text_atomic(out / "compare.txt", table + "\n")
    write_json_atomic(out / "compare.json", json_safe(result))
    if log is not None:
        log(table)
        log(f"wrote {out / 'compare.json'}")
    return result


def format_comparison(result: dict[str, Any]) -> str:
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             f"{result['num_images']} images, {result['num_patients']} patients", "DeLong, AUC per class (A - B):"]
    for name, test in result["delong"].items():
        if "error" in test:
            lines.append(f"  {name}: {test['error']}")
        else:
            lines.append(f"  {name}: {test['auc_a']:.3f} vs {test['auc_b']:.3f}, difference {test['difference']:+.3f} "
                         f"[{test['low']:+.3f}, {test['high']:+.3f}], p = {test['p_value']:.3g}")
    lines.append("paired bootstrap (A - B):")
    for key, cell in result["paired_bootstrap"].items():
        if isinstance(cell, dict):
            lines.append(f"  {key}: {cell['a']:.3f} vs {cell['b']:.3f}, difference {cell['difference']:+.3f} "
                         f"[{cell['low']:+.3f}, {cell['high']:+.3f}], p = {cell['p_value']:.3g} ({cell['n_used']} resamples)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="caaxr compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="run folder or predictions file (A)")
    parser.add_argument("b", help="run folder or predictions file (B)")
    parser.add_argument("--protocol", default=None, help="protocol folder (needed for prediction files)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        compare(args.a, args.b, protocol=args.protocol, split=args.split, fold=args.fold, n_resamples=args.bootstrap,
                seed=args.seed, tolerance=args.tolerance, out=args.out, plots=not args.no_plots)
    except (PredictionsError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, (PredictionsError, FileNotFoundError)) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
