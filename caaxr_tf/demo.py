"""The end-to-end demo behind ``make demo``: synthetic data → TFRecords → tf.data batches.

    python -m caaxr_tf.demo --out demo_output [--scale small] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--scale", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=10, help="training steps per model (one epoch)")
    parser.add_argument("--skip-training", action="store_true", help="stop after the pipeline check")
    return parser.parse_args(argv)


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

    from caaxr_tf.data.pipeline import make_dataset, read_summary

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


# Brief training for the demo: the paper's models, fold 1, one short epoch each, small
# segmentation nets so it finishes in minutes on a laptop CPU.
DEMO_MODELS = {"seg": ["unet", "segnet"], "2class": ["mobilenetv2", "resnet18"],
               "3class": ["mobilenetv2", "resnet18"], "4class": ["mobilenetv2", "resnet18"]}


def train_and_evaluate(tfrecord_root: Path, cv_root: Path, steps: int) -> dict[str, list[dict]]:
    from caaxr_tf.cv import run_cv

    print(f"[4/5] training each protocol's models for {steps} steps (fold 1) and evaluating on the test split ...",
          flush=True)
    results = {}
    for protocol, models in DEMO_MODELS.items():
        train_args = ["--epochs", "1", "--steps-per-epoch", str(steps), "--quiet"]
        if protocol == "seg":
            train_args += ["--set", "model_kwargs.base_filters=16", "--lr", "1e-3", "--set", "loss=bce_dice"]
        else:
            train_args += ["--lr", "1e-2"]
        results[protocol] = run_cv(
            protocol, models, tfrecord_root, cv_root / protocol, folds=[1], train_args=train_args,
            log=lambda line: print("      " + line) if line.startswith("[") else None,
        )
    return results


def print_tables(tfrecord_root: Path, results: dict[str, list[dict]]) -> None:
    from caaxr_tf.cv import format_results_table, paper_columns
    from caaxr_tf.data.pipeline import read_summary

    for number, protocol in enumerate(results, start=1):
        summary = read_summary(tfrecord_root / protocol)
        columns = paper_columns(summary["task"], summary["classes"], sorted(summary.get("subsets") or {}))
        title = "Table 1 (segmentation)" if protocol == "seg" else f"Table 2 ({protocol})"
        print(f"\n{title}: test split, fold 1, after a few training steps on synthetic data")
        print(format_results_table(results[protocol], columns, markdown=False))


def export_and_predict(out: Path, data_root: Path) -> None:
    from caaxr_tf.export import export_run
    from caaxr_tf.predict import predict_files

    print("[5/5] exporting one classifier and one segmentation model for TF Serving, then predicting:", flush=True)
    files = sorted((data_root / "bimcv").rglob("*_vp-pa_*.png"))[:2] + sorted((data_root / "chexpert").rglob("view1_frontal.jpg"))[:2]
    for run_dir, name in ((out / "cv" / "2class" / "resnet18" / "fold1", "caaxr_2class_resnet18"),
                          (out / "cv" / "seg" / "unet" / "fold1", "caaxr_seg_unet")):
        export_dir = export_run(run_dir, out / "saved_models" / name, overwrite=True, version=1)
        print(f"      exported {run_dir} -> {export_dir}")
        for result in predict_files(export_dir, [str(f) for f in files], overlay_dir=out / "overlays"):
            result = {k: v for k, v in result.items() if k not in ("boxes", "scores", "classes")}
            result["file"] = Path(result["file"]).name
            print("      " + json.dumps(result, sort_keys=True))
    print(f"      models.config: {out / 'saved_models' / 'models.config'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    data_root = out / "data"
    tfrecord_root = out / "tfrecords"
    ensure_synthetic(data_root, args.scale, args.seed, args.workers)

    from caaxr_tf.data.tfrecords import build_tfrecords

    print(f"[2/5] writing TFRecords for every protocol to {tfrecord_root} ...", flush=True)
    started = time.perf_counter()
    summaries = build_tfrecords(
        data_root, tfrecord_root, source="caaxr", protocols="all", seed=args.seed, workers=args.workers,
        progress=sys.stderr.isatty(), log=lambda line: print("      " + line.replace("\n", "\n      ")),
    )
    print(f"      done in {time.perf_counter() - started:.1f} s")
    show_batches(tfrecord_root, list(summaries))
    if not args.skip_training:
        results = train_and_evaluate(tfrecord_root, out / "cv", args.steps)
        print_tables(tfrecord_root, results)
        export_and_predict(out, data_root)
    print(f"demo finished: outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
