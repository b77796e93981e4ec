"""The end-to-end demo behind ``make demo``, about five minutes on two CPU cores:

1. a synthetic CAAXR dataset in the real on-disk layouts (BIMCV, CAAXR, CheXpert);
2. TFRecords for every protocol (seg, 2class, 3class, 4class);
3. one tf.data training batch per protocol;
4. one model per protocol trained briefly from scratch and evaluated on the test split, with the
   paper's tables and the scores of constant predictions beside them;
5. a classifier and a U-Net exported for TF Serving, then predictions on a few source files.

    python -m caaxr_tf.demo --out demo_output [--scale small] [--seed 0] [--steps-scale 1.0]
        [--protocols seg,2class,3class,4class]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from caaxr_tf.logs import quiet_tensorflow_logs
from caaxr_tf.cv import (
    BASELINES_JSON,
    TrainingOptions,
    format_baselines_table,
    format_results_table,
    protocol_task,
    run_cv,
)
from caaxr_tf.data.pipeline import read_summary
from caaxr_tf.export import export_run
from caaxr_tf.predict import predict_files
from caaxr_tf.tasks.datasets import make_dataset

quiet_tensorflow_logs()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--scale", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every model's training steps (e.g. 0.1 for a smoke test)")
    parser.add_argument("--protocols", default=",".join(DEMO_RUNS),
                        help="comma-separated subset of the demo's protocols (default: all of them)")
    parser.add_argument("--skip-training", action="store_true", help="stop after the pipeline check")
    args = parser.parse_args(argv)
    args.protocols = [name.strip() for name in args.protocols.split(",") if name.strip()]
    unknown = [name for name in args.protocols if name not in DEMO_RUNS]
    if unknown or not args.protocols:
        parser.error(f"--protocols: {', '.join(unknown) or 'none given'}; choose from {', '.join(DEMO_RUNS)}")
    return args


def ensure_synthetic(data_root: Path, scale: str, seed: int, workers: int) -> None:
    from caaxr_tf.data.synthetic import generate

    marker = data_root / "synthetic.json"
    if marker.exists():
        made = json.loads(marker.read_text(encoding="utf-8"))
        if made.get("scale") == scale and made.get("seed") == seed:
            print(f"[1/5] synthetic dataset ({scale}, seed {seed}) already in {data_root}")
            return
    started = time.perf_counter()
    print(f"[1/5] generating the {scale} synthetic dataset in {data_root} ...", flush=True)
    generate(data_root, scale=scale, seed=seed, workers=workers, progress=sys.stderr.isatty())
    print(f"      done in {time.perf_counter() - started:.1f} s")


def show_batches(tfrecord_root: Path, protocols: list[str]) -> None:
    import numpy as np

    print("[3/5] one training batch per protocol (fold 1, augmentation on):")
    print(f"  {'protocol':<8} {'images':<22} {'target':<22} contents")
    for name in protocols:
        summary = read_summary(tfrecord_root / name)
        dataset = make_dataset(tfrecord_root / name, "train", fold=1, batch_size=8, cache=False)
        images, target = next(iter(dataset))
        if summary["task"] == "classification":
            counts = np.bincount(np.argmax(target.numpy(), axis=-1), minlength=len(summary["classes"]))
            contents = ", ".join(f"{c}={n}" for c, n in zip(summary["classes"], counts))
        else:
            contents = f"mask covers {float(np.mean(target.numpy())):.1%} of pixels"
        print(
            f"  {name:<8} {str(tuple(images.shape)):<22} {str(tuple(target.shape)):<22} {contents}; "
            f"pixels {float(images.numpy().min()):.0f}..{float(images.numpy().max()):.0f}"
        )


# Short training for the demo, chosen so that every model visibly learns on the small synthetic
# set within about five minutes on two CPU cores (see README): one model per protocol, fold 1,
# nothing pretrained. U-Net at 8 base filters with BCE + soft Dice (plain BCE stays at the empty
# mask for many epochs on small lesions); ResNet-18 with Adam 1e-3 (the paper's SGD 1e-3 needs
# far more steps from scratch) and BatchNorm statistics re-estimated after each epoch (after so few
# steps the moving averages lag far behind the weights: test accuracy 0.43 with them, 0.73 with
# re-estimated ones, at the same AUC). caaxr_tf/configs/train.yaml keeps the paper's settings for real runs.
DEMO_RUNS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "seg": ("unet", {"epochs": 2, "steps_per_epoch": 50, "batch_size": 8, "learning_rate": 3e-3},
            ["model_kwargs.base_filters=8", "loss=bce_dice"]),
    "2class": ("resnet18", {"epochs": 2, "steps_per_epoch": 15, "batch_size": 10},
               ["optimizer={name: adam, learning_rate: 1.0e-3}", "bn_recompute_images=100"]),
}
DEMO_RUNS["3class"] = DEMO_RUNS["4class"] = DEMO_RUNS["2class"]


def train_and_evaluate(tfrecord_root: Path, cv_root: Path, steps_scale: float,
                       protocols: list[str]) -> dict[str, list[dict]]:
    print("[4/5] training one model per protocol (fold 1, from scratch) and evaluating it on the test split ...",
          flush=True)
    results = {}
    for protocol in protocols:
        model, flags, overrides = DEMO_RUNS[protocol]
        flags = {**flags, "steps_per_epoch": max(1, round(flags["steps_per_epoch"] * steps_scale))}
        started = time.perf_counter()
        results[protocol] = run_cv(protocol, [model], tfrecord_root, cv_root / protocol, folds=[1],
                                   training=TrainingOptions(flags=flags, overrides=overrides),
                                   eval_batch_size=32, log=lambda line: None)
        print(f"      {protocol:<7} {model:<9} {_learning_curve(cv_root / protocol / model / 'fold1')}"
              f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def _learning_curve(run_dir: Path) -> str:
    """``loss 1.31 → 0.42, val_dice 0.05 → 0.61`` from the run's history.csv."""
    import csv

    with open(run_dir / "history.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    monitor = "val_dice" if "val_dice" in rows[0] else "val_auc_mean"
    shown = []
    for key in ("loss", monitor):
        values = " → ".join(f"{float(row[key]):.2f}" for row in rows)
        shown.append(f"{key} {values}")
    return ", ".join(shown) + f" over {len(rows)} epochs"


def print_tables(tfrecord_root: Path, cv_root: Path, results: dict[str, list[dict]]) -> None:
    from caaxr_tf.data.schema import read_summary

    for protocol, rows in results.items():
        summary = read_summary(tfrecord_root / protocol)
        task = protocol_task(summary["task"], summary["classes"])
        columns = task.paper_columns(sorted(summary.get("subsets") or {}))
        title = "Table 1 (segmentation)" if protocol == "seg" else f"Table 2 ({protocol})"
        print(f"\n{title}: test split, fold 1, after a short training on synthetic data")
        print(format_results_table(rows, columns, markdown=False))
        baselines = json.loads((cv_root / protocol / BASELINES_JSON).read_text(encoding="utf-8"))
        print("constant predictions on the same images (what a model that learnt nothing scores):")
        print(format_baselines_table(baselines, columns, task, markdown=False))


def export_and_predict(out: Path, data_root: Path, protocols: list[str]) -> None:
    print("[5/5] exporting one classifier and one segmentation model for TF Serving, then predicting:", flush=True)
    files = sorted((data_root / "bimcv").rglob("*_vp-pa_*.png"))[:2] + sorted((data_root / "chexpert").rglob("view1_frontal.jpg"))[:2]
    for protocol in [name for name in ("2class", "seg") if name in protocols]:
        model = DEMO_RUNS[protocol][0]
        run_dir, name = out / "cv" / protocol / model / "fold1", f"caaxr_{protocol}_{model}"
        export_dir = export_run(run_dir, out / "saved_models" / name, overwrite=True, version=1)
        print(f"      exported {run_dir} -> {export_dir}")
        overlays = out / "overlays" if protocol == "seg" else None  # a classifier draws no overlay
        for result in predict_files(export_dir, [str(f) for f in files], overlay_dir=overlays):
            result = {k: v for k, v in result.items() if k not in ("boxes", "scores", "classes")}
            result["file"] = Path(result["file"]).name
            print("      " + json.dumps(result, sort_keys=True))
    print(f"      models.config: {out / 'saved_models' / 'models.config'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo_started = time.perf_counter()
    out = Path(args.out)
    data_root = out / "data"
    tfrecord_root = out / "tfrecords"
    ensure_synthetic(data_root, args.scale, args.seed, args.workers)

    from caaxr_tf.data.tfrecords import build_tfrecords

    print(f"[2/5] writing TFRecords for the paper's protocols ({', '.join(args.protocols)}) to {tfrecord_root} ...",
          flush=True)
    started = time.perf_counter()
    summaries = build_tfrecords(
        data_root, tfrecord_root, source="caaxr", protocols=args.protocols, seed=args.seed, workers=args.workers,
        progress=sys.stderr.isatty(), log=lambda line: print("      " + line.replace("\n", "\n      ")),
    )
    print(f"      done in {time.perf_counter() - started:.1f} s")
    show_batches(tfrecord_root, list(summaries))
    if not args.skip_training:
        results = train_and_evaluate(tfrecord_root, out / "cv", args.steps_scale, args.protocols)
        print_tables(tfrecord_root, out / "cv", results)
        export_and_predict(out, data_root, args.protocols)
    print(f"demo finished in {time.perf_counter() - demo_started:.0f} s: outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
