"""Per-fold and mean tables of CT runs: per slice and per patient.

    python -m caaxr_tf.ct.report --runs RUN [RUN ...] --patients DATA_ROOT [--out DIR] [--reuse]

Each run (one fold of ``covid-ctset: ct``, see docs/run_dir.md) is evaluated on its test split
with the patient pipeline (``caaxr_tf.evaluate --patients``; ``--reuse`` takes an existing
``eval/metrics.json`` that has patient results), then two tables are printed (and written as
``ct_slices.md``/``ct_patients.md`` and ``ct_report.json`` under ``--out``):

* per slice: accuracy, sensitivity and precision of each class, on the labelled slices;
* per patient, for threshold 1 (one COVID slice) and threshold 2 (>= 10 % of the selected
  slices): patients correct, COVID → normal, normal → COVID;

one row per fold and their mean (± standard deviation over folds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from caaxr_tf.io import write_json_atomic, write_text_atomic
from caaxr_tf.evaluate import evaluate_run, metrics_path


def fold_rows(metrics: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]], list[str], list[list[Any]]]:
    """The slice and patient tables (headers and rows, the mean row last) of evaluated runs."""
    names = metrics[0]["class_names"]
    slice_header = ["fold", "model", "slices", "accuracy"] + [f"sens. {n}" for n in names] + [f"prec. {n}" for n in names]
    patient_header = ["fold", "model", "patients", "selected / slices",
                      "t1 correct", "t1 COVID->normal", "t1 normal->COVID",
                      "t2 correct", "t2 COVID->normal", "t2 normal->COVID"]
    slice_rows, patient_rows = [], []
    for m in metrics:
        slice_rows.append([m["fold"], m["model"], m["num_images"], m["accuracy"]]
                          + [m["sensitivity"][n] for n in names] + [m["precision"][n] for n in names])
        p = m["patients"]
        patient_rows.append([m["fold"], m["model"], p["patients"], f"{p['selected_slices']} / {p['slices']}"]
                            + [p[t][k] for t in ("threshold1", "threshold2")
                               for k in ("correct", "covid_to_normal", "normal_to_covid")])
    slice_rows.append(["mean", "", *_mean(slice_rows, 2)])
    patient_rows.append(["mean", "", _mean_one([r[2] for r in patient_rows]), ""]
                        + _mean([r[:2] + r[4:] for r in patient_rows], 2))
    return slice_header, slice_rows, patient_header, patient_rows


def _mean_one(values: Sequence[Any]) -> str:
    numbers = np.array([v for v in values if v is not None], dtype=np.float64)
    if not numbers.size:
        return "n/a"
    return f"{numbers.mean():.4g} ± {numbers.std():.2g}" if numbers.size > 1 else f"{numbers.mean():.4g}"


def _mean(rows: Sequence[Sequence[Any]], start: int) -> list[str]:
    return [_mean_one([row[i] for row in rows]) for i in range(start, len(rows[0]))]


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report(runs: Sequence[str | Path], patients: str | Path, out: str | Path | None = None, *,
           reuse: bool = False, batch_size: int | None = None) -> dict[str, Any]:
    """Evaluate ``runs`` with the patient pipeline (or reuse their metrics) and tabulate them."""
    metrics = []
    for run in runs:
        path = metrics_path(run)
        existing = json.loads(path.read_text()) if reuse and path.exists() else None
        if existing is None or "patients" not in existing:
            existing = evaluate_run(run, batch_size=batch_size, plots=False, log=None, patients=patients)
        if existing.get("task") != "ct":
            raise ValueError(f"{run}: not a CT run (task {existing.get('task')!r})")
        metrics.append(existing)
    metrics.sort(key=lambda m: (m["fold"], m["model"]))
    slice_header, slice_rows, patient_header, patient_rows = fold_rows(metrics)
    tables = {"slices": markdown(slice_header, slice_rows), "patients": markdown(patient_header, patient_rows)}
    if out is not None:
        out = Path(out)
        write_text_atomic(out / "ct_slices.md", tables["slices"])
        write_text_atomic(out / "ct_patients.md", tables["patients"])
        write_json_atomic(out / "ct_report.json", {"runs": [m["run_dir"] for m in metrics], "tables": tables,
                                                   "metrics": metrics})
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m caaxr_tf.ct.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders of the ct protocol (one per fold)")
    parser.add_argument("--patients", required=True, metavar="DATA_ROOT", help="the COVID-CTset folder")
    parser.add_argument("--out", default=None, help="write ct_slices.md, ct_patients.md, ct_report.json here")
    parser.add_argument("--reuse", action="store_true", help="reuse eval/metrics.json when it has patient results")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        tables = report(args.runs, args.patients, args.out, reuse=args.reuse, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("Per slice (labelled test slices)\n\n" + tables["slices"])
    print("Per patient (every slice of each test patient's series; t1: > 0 COVID slices, "
          "t2: >= 10 % of the selected slices)\n\n" + tables["patients"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
