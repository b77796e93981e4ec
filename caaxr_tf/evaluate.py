"""Evaluate a trained run on its protocol's test (or validation) split.

    python -m caaxr_tf.evaluate --run RUN_DIR [--split test|val] [--subset consolidation]
                                [--batch-size N] [--model best|final] [--no-plots]

The run folder (see docs/run_dir.md) gives the model, the protocol folder and the fold.
Results go to ``RUN_DIR/eval/`` and are written atomically (temporary name, then rename):

    metrics<tag>.json       the numbers below
    predictions<tag>.csv    one row per image (segmentation: Dice/IoU; classifiers: scores)
    roc<tag>.png            classifiers: one-vs-rest ROC curve per class, AUC in the legend
    confusion_matrix<tag>.png  classifiers: counts and row percentages
    examples<tag>.png       segmentation: image / ground truth / prediction overlays

``<tag>`` is empty for the default evaluation (test split, no subset, best model), so that is
``eval/metrics.json``; otherwise it is ``_<split>[_<subset>][_final]``, e.g.
``metrics_test_consolidation.json`` or ``metrics_val.json``.

metrics.json, common keys: ``run_dir``, ``model``, ``model_file``, ``protocol``, ``task``,
``fold``, ``split``, ``subset``, ``tfrecords``, ``num_images``, ``seconds``, ``files``.

* Segmentation: ``dice`` and ``iou`` are means over images of the per-image scores of
  ``caaxr_tf.metrics.dice_per_image`` / ``iou_per_image`` (prediction foreground where the
  probability is >= ``threshold`` 0.5; an image with empty ground truth and empty prediction
  scores ``empty_score`` 1.0), with ``dice_std`` / ``iou_std`` over images.
* Classification: ``class_names``; ``auc_per_class`` {class: one-vs-rest ROC AUC};
  ``auc_macro`` (their mean); ``covid_class`` and ``sensitivity_at_99_specificity`` /
  ``sensitivity_at_90_specificity``, COVID one-vs-all, exact
  (``caaxr_tf.metrics.sensitivity_at_specificity``): the COVID class is the one named
  ``covid`` (case-insensitive), else class 0; ``accuracy`` (arg-max prediction);
  ``confusion_matrix`` ``{"classes": [...], "matrix": [[...]]}`` with rows = true class and
  columns = predicted class, in ``classes`` order.

Values that are undefined (e.g. the AUC of a class absent from the split) are ``null``.
Models may output a tensor (U-Net, SegNet, classifiers) or a dict whose ``mask`` entry is
the mask probabilities (Mask R-CNN).

What is computed, plotted and written per image belongs to the run's task
(``caaxr_tf.tasks``: ``Task.evaluate``); this module finds the run, its model and its split,
and writes the task's results.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from caaxr_tf.io import json_safe, write_json_atomic, write_text_atomic  # noqa: E402
from caaxr_tf.metrics.classification import classification_metrics, covid_index  # noqa: E402,F401  (re-exported)

SPLITS = ("test", "val")
MODEL_FILES = ("best", "final")
NUM_EXAMPLES = 4


def output_tag(split: str = "test", subset: str | None = None, which: str = "best") -> str:
    """File-name tag of one evaluation: "" for the default, else ``_<split>[_<subset>][_final]``."""
    if split == "test" and subset is None and which == "best":
        return ""
    return f"_{split}" + (f"_{subset}" if subset else "") + ("_final" if which == "final" else "")


def metrics_path(run_dir: str | Path, split: str = "test", subset: str | None = None, which: str = "best") -> Path:
    """Where `evaluate_run` writes the metrics of this evaluation."""
    from caaxr_tf.runs import EVAL_DIR

    return Path(run_dir) / EVAL_DIR / f"metrics{output_tag(split, subset, which)}.json"


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def run_task(config: dict[str, Any], summary: dict[str, Any]):
    """The Task object of a run folder's config (class names from the run, else the protocol)."""
    from caaxr_tf.tasks import task_of_run

    task_class = task_of_run(config.get("task") or summary["task"], config.get("model"))
    return task_class([str(c) for c in (config.get("class_names") or summary["classes"])],
                      target_names=config.get("target_names") or summary.get("target_names") or ())


def _check_inputs(run_dir: Path, split: str, subset: str | None, which: str) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Config, protocol folder and summary of a run; one-line errors for what is missing."""
    from caaxr_tf.data.schema import read_summary, shard_files
    from caaxr_tf.runs import BEST_MODEL, FINAL_MODEL, load_run_config

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if which not in MODEL_FILES:
        raise ValueError(f"unknown model file {which!r}; expected one of {', '.join(MODEL_FILES)}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    config = load_run_config(run_dir)
    if not isinstance(config, dict) or "tfrecords" not in config:
        raise ValueError(f"{run_dir / 'config.yaml'} has no 'tfrecords' entry: not a run folder written by caaxr_tf.train")
    model_file = run_dir / (BEST_MODEL if which == "best" else FINAL_MODEL)
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file} not found: the run in {run_dir} has not saved a {which} model yet")
    tfrecords = Path(config["tfrecords"])
    summary = read_summary(tfrecords)
    run_task(config, summary)  # an unknown task is an error before anything is read
    fold = int(config.get("fold") or 1)
    shard_files(tfrecords, split, fold)  # raises for a split or fold that does not exist
    if subset is not None and subset not in summary.get("subsets", {}):
        known = ", ".join(summary.get("subsets", {})) or "none"
        raise ValueError(f"unknown subset {subset!r}; {tfrecords} has: {known}")
    return config, tfrecords, summary


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    subset: str | None = None,
    batch_size: int | None = None,
    which: str = "best",
    *,
    plots: bool = True,
    num_examples: int = NUM_EXAMPLES,
    log: Callable[[str], None] | None = print,
    patients: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the ``which`` model of a run on ``split`` (optionally one subset of it).

    Writes ``RUN_DIR/eval/metrics.json`` for the default (test split, no subset, best model)
    and ``RUN_DIR/eval/metrics_<split>[_<subset>][_final].json`` otherwise, plus the per-image
    CSV and the task's plots (see the module docstring), and returns the metrics dict. ``log``
    receives the printed summary table (None: silent).

    ``patients`` (the ct task): the COVID-CTset folder the records were built from; the
    split's patients then also go through selection → classification → the patient rule
    (``metrics["patients"]``, ``patients<tag>.csv``).

    Raises ``ValueError`` when the model's outputs are not finite (nothing is written) or the
    run's task is unknown, and ``tf.errors.DataLossError`` naming the shard when a shard of the
    split is damaged.
    """
    from caaxr_tf.data.schema import shard_files
    from caaxr_tf.data.shards import naming_corrupt_shards

    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    config, tfrecords, _ = _check_inputs(Path(run_dir).resolve(), split, subset, which)
    with naming_corrupt_shards(shard_files(tfrecords, split, int(config.get("fold") or 1))):
        return _evaluate_run(run_dir, split, subset, batch_size, which, plots=plots, num_examples=num_examples, log=log,
                             patients=patients)


def _evaluate_run(
    run_dir: str | Path,
    split: str,
    subset: str | None,
    batch_size: int | None,
    which: str,
    *,
    plots: bool,
    num_examples: int,
    log: Callable[[str], None] | None,
    patients: str | Path | None = None,
) -> dict[str, Any]:
    from caaxr_tf.data.pipeline import make_dataset
    from caaxr_tf.runs import BEST_MODEL, EVAL_DIR, FINAL_MODEL, load_run_model
    from caaxr_tf.tasks import EvalContext

    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    config, tfrecords, summary = _check_inputs(run_dir, split, subset, which)
    task = run_task(config, summary)
    fold = int(config.get("fold") or 1)
    batch_size = int(batch_size or config.get("batch_size") or 32)
    model = load_run_model(run_dir, which)
    predict = predict_function(model)
    dataset = make_dataset(
        tfrecords, split, fold=fold, batch_size=batch_size, task=task, training=False, augment=False,
        cache=False, subset=subset, with_ids=True, image_size=int(config.get("image_size") or 224),
    )
    if patients is not None and not hasattr(task, "evaluate_patients"):
        raise ValueError(f"--patients applies to CT runs (the ct task); this run's task is {task.name}")
    tag = output_tag(split, subset, which)
    eval_dir = run_dir / EVAL_DIR
    where = f"{split} split" + (f", {subset} subset" if subset else "")
    context = EvalContext(eval_dir, tag, f"{config.get('model', '?')} — {config.get('protocol', '?')}, fold {fold}, {where}",
                          plots=plots, num_examples=num_examples)
    if patients is not None:
        context.patients, context.protocol_dir = Path(patients), tfrecords
        context.split, context.fold, context.batch_size = split, fold, batch_size
        context.image_size = int(config.get("image_size") or 224)
    try:
        result = task.evaluate(predict, dataset, context)
    except ValueError as error:
        if str(error) == "no images in this split":
            raise ValueError(f"no images in the {where} of {tfrecords}") from None
        raise

    metrics: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": config.get("model"),
        "model_file": BEST_MODEL if which == "best" else FINAL_MODEL,
        "protocol": config.get("protocol", summary.get("protocol")),
        "task": task.name,
        "fold": fold,
        "split": split,
        "subset": subset,
        "tfrecords": str(tfrecords),
        **result.metrics,
    }
    files = dict(context.files)
    files["predictions"] = f"predictions{tag}.csv"
    write_text_atomic(eval_dir / files["predictions"], csv_text(result.header, result.rows))
    metrics["files"] = files
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics = json_safe(metrics)
    write_json_atomic(eval_dir / f"metrics{tag}.json", metrics)
    if log is not None:
        log(format_metrics(metrics, task))
        log(f"wrote {eval_dir / f'metrics{tag}.json'}")
    return metrics


def predict_function(model) -> Callable[[Any], Any]:
    """``images -> numpy outputs`` through one graph traced for any batch size."""
    import tensorflow as tf

    try:
        spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
    except (AttributeError, TypeError, IndexError, ValueError):  # a subclassed model without known inputs
        spec = None
    if spec is None:
        step = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    else:
        step = tf.function(lambda images: model(images, training=False), input_signature=[spec])

    def predict(images) -> Any:
        outputs = step(tf.convert_to_tensor(images, tf.float32))
        if isinstance(outputs, dict):
            return {key: value.numpy() for key, value in outputs.items()}
        if isinstance(outputs, (list, tuple)):
            return outputs[0].numpy()  # a multi-output model's first output
        return outputs.numpy()

    return predict


def format_metrics(metrics: dict[str, Any], task=None) -> str:
    """A short plain-text table of one evaluation."""
    from caaxr_tf.tasks import get_task

    subset = f", subset {metrics['subset']}" if metrics.get("subset") else ""
    lines = [
        f"{metrics.get('model')} ({metrics.get('protocol')}, fold {metrics.get('fold')}, {metrics.get('model_file')}) "
        f"on the {metrics.get('split')} split{subset}: {metrics.get('num_images')} images"
    ]
    task = task or get_task(metrics["task"])(metrics.get("class_names") or [])
    return "\n".join(lines + task.format_metrics(metrics))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m caaxr_tf.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run folder written by caaxr_tf.train")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--subset", default=None, help="a subset of the protocol, e.g. consolidation")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    parser.add_argument("--model", default="best", choices=MODEL_FILES, help="best.keras or final.keras")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--patients", default=None, metavar="DATA_ROOT",
                        help="ct task: the COVID-CTset folder; also evaluate the split's patients "
                             "(select, classify, patient rule)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    try:
        evaluate_run(args.run, args.split, args.subset, args.batch_size, args.model, plots=not args.no_plots,
                     patients=args.patients)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except tf.errors.DataLossError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
