"""Accuracy parity of bfloat16 inference: tiny trained runs evaluated in float32 and bfloat16.

    python -m benchmarks.precision_parity [--work-dir DIR] [--tasks seg,cls,infection,ct] [--json OUT]

Each task gets a tiny synthetic set (``caaxr_tf.data.synthetic*``, scale ``tiny``), a short
training run (``caaxr_tf.cv``: fold 1, 2 epochs of 15 steps at 64 px, CT 96 px; the weights then differ
from random ones, which is what matters for parity) and two evaluations of the same best
model, ``--precision float32`` and ``--precision bfloat16`` (``caaxr_tf.evaluate``). Printed:
the metrics side by side and their difference, plus the largest per-image output
difference (from the predictions CSVs where they hold probabilities).

Metrics: seg — Dice, IoU; cls (3class, resnet18) — macro AUC, accuracy; infection (QaTa
protocol, unet) — pixel F1, Dice; ct (fpn_resnet50v2) — slice accuracy, AUC, and the patient verdicts (``--patients``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from caaxr_tf.logs import quiet_tensorflow_logs

quiet_tensorflow_logs()

TASKS = {
    # name: (synthetic module, source, protocol, model, metric keys, extra cv --set)
    "seg": ("synthetic", "caaxr", "seg", "unet", ("dice", "iou"), ["model_kwargs.base_filters=4"]),
    "cls": ("synthetic", "caaxr", "3class", "resnet18", ("auc_macro", "accuracy"), []),
    "infection": ("synthetic_qata", "qata", "infection", "unet", ("pixel_f1", "dice"), ["model_kwargs.base_filters=4"]),
    "ct": ("synthetic_ct", "covid-ctset", "ct", "fpn_resnet50v2", ("accuracy", "auc_macro"), []),
}
IMAGE_SIZE = 64
IMAGE_SIZES = {"ct": 96}  # fpn_resnet50v2 needs at least 96 px


def prepare(work: Path, name: str) -> Path:
    """The task's tiny data and TFRecords (kept in ``work``); returns the TFRecords folder."""
    import importlib

    from caaxr_tf.data.tfrecords import build_tfrecords

    module, source, protocol, *_ = TASKS[name]
    root = work / f"data-{module}"
    if not root.is_dir():
        importlib.import_module(f"caaxr_tf.data.{module}").generate(root, scale="tiny", seed=0)
    tfrecords = work / f"tfrecords-{module}"
    if not (tfrecords / protocol / "summary.json").exists():
        build_tfrecords(root, tfrecords, source=source, protocols=[protocol], workers=1, progress=False,
                        log=lambda _: None)
    return tfrecords


def train(work: Path, name: str, tfrecords: Path) -> Path:
    from caaxr_tf import cv

    _, _, protocol, model, _, sets = TASKS[name]
    out = work / f"cv-{name}"
    run_dir = out / model / "fold1"
    if not (run_dir / "best.keras").exists():
        argv = ["--protocol", protocol, "--models", model, "--tfrecords", str(tfrecords), "--out", str(out),
                "--folds", "1", "--epochs", "2", "--steps-per-epoch", "15", "--lr", "3e-3",
                "--set", f"image_size={IMAGE_SIZES.get(name, IMAGE_SIZE)}", "--set", "weights=none", "--quiet", "--no-plots"]
        for item in sets:
            argv += ["--set", item]
        if cv.main(argv) != 0:
            raise RuntimeError(f"training the {name} run failed")
    return run_dir


def output_columns(path: Path) -> list[list[float]]:
    """Per-image float columns of a predictions CSV that hold probabilities/scores."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = [k for k in rows[0] if k.startswith(("p_", "score", "prob")) or k in ("covid_probability",)] if rows else []
    return [[float(row[k]) for k in keys if row[k] not in ("", None)] for row in rows]


def parity(work: Path, name: str) -> dict[str, Any]:
    from caaxr_tf.evaluate import evaluate_run

    started = time.perf_counter()
    tfrecords = prepare(work, name)
    run_dir = train(work, name, tfrecords)
    trained = time.perf_counter() - started
    # ct: also the patient path (selection -> slice classification -> the patient rule)
    patients = work / f"data-{TASKS[name][0]}" if name == "ct" else None
    results = {p: evaluate_run(run_dir, plots=False, log=None, precision=p, patients=patients)
               for p in ("float32", "bfloat16")}
    keys = TASKS[name][4]
    row: dict[str, Any] = {"task": name, "model": TASKS[name][3], "protocol": TASKS[name][2],
                           "images": results["float32"].get("num_images"), "train_seconds": round(trained, 1)}
    for key in keys:
        a, b = results["float32"].get(key), results["bfloat16"].get(key)
        row[key] = {"float32": a, "bfloat16": b,
                    "difference": None if a is None or b is None else b - a}
    if patients is not None:
        row["patients"] = {p: results[p].get("patients") for p in results}
    tags = {"float32": "", "bfloat16": "_bfloat16"}
    columns = {p: output_columns(run_dir / "eval" / f"predictions{tags[p]}.csv") for p in tags}
    diffs = [abs(x - y) for r32, r16 in zip(columns["float32"], columns["bfloat16"]) for x, y in zip(r32, r16)]
    row["max_output_difference"] = max(diffs) if diffs else None
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision_parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="caaxr-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        try:
            rows.append(parity(work, name))
        except Exception as error:  # one failing task must not lose the others
            rows.append({"task": name, "error": f"{type(error).__name__}: {error}"})
        print(json.dumps(rows[-1]), flush=True)
    print("| task | model | images | metric | float32 | bfloat16 | difference |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for key in TASKS[row["task"]][4]:
            if key in row:
                m = row[key]
                fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
                print(f"| {row['task']} | {row['model']} | {row['images']} | {key} | {fmt(m['float32'])} | "
                      f"{fmt(m['bfloat16'])} | {fmt(m['difference'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load_average": os.getloadavg()}, indent=2) + "\n")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
