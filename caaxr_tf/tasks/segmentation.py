"""Binary segmentation (the CAAXR ``seg`` protocol, lungs, infection masks): a mask per image
from the record's boxes or its pixel mask, per-image losses, per-image Dice and IoU."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from caaxr_tf.tasks.base import BootstrapInputs, EvalContext, EvalResult, Predict, Task, check_finite, format_value, register_task
from caaxr_tf.models.outputs import mask_output  # noqa: F401  (moved to caaxr_tf.models.outputs; re-exported)
from caaxr_tf import losses, metrics
from caaxr_tf.data.pipeline import augment_batch, boxes_to_mask, decode_common, decode_mask, make_dataset
from caaxr_tf.metrics import dice_per_image, iou_per_image

THRESHOLD = 0.5  # a pixel is foreground where the probability is >= THRESHOLD
EMPTY_SCORE = 1.0  # Dice / IoU of an image with empty truth and empty prediction
CONSTANT_PREDICTIONS = {"empty mask": 0.0, "all-ones mask": 1.0}


def mean_dice_iou(dice: np.ndarray, iou: np.ndarray) -> dict[str, float]:
    """``dice`` and ``iou`` of `segmentation_metrics` (what the bootstrap resamples)."""
    scores = segmentation_metrics(np.asarray(dice, np.float64), np.asarray(iou, np.float64))
    return {"dice": scores["dice"], "iou": scores["iou"]}


def segmentation_metrics(dice: np.ndarray, iou: np.ndarray) -> dict[str, Any]:
    """Means and standard deviations over images of per-image Dice and IoU."""

    def stat(values: np.ndarray, fn) -> float:
        values = values[np.isfinite(values)]
        return float(fn(values)) if values.size else float("nan")

    return {
        "dice": stat(dice, np.mean),
        "iou": stat(iou, np.mean),
        "dice_std": stat(dice, np.std),
        "iou_std": stat(iou, np.std),
        "threshold": THRESHOLD,
        "empty_score": EMPTY_SCORE,
    }


@register_task
class SegmentationTask(Task):
    """One binary mask per image: the record's pixel mask when it has one, else its boxes
    (a pixel is inside a box when its centre is)."""

    name = protocol_task = model_task = "segmentation"
    has_overlay = True
    losses = ("binary_crossentropy", "bce_dice", "focal_dice")
    reported_outputs = ("mask",)

    # inputs -----------------------------------------------------------------------

    def decode(self, record: Mapping[str, tf.Tensor], image_size: int) -> dict[str, tf.Tensor]:
        decoded = decode_common(record, image_size)
        has_mask = tf.strings.length(record["mask/encoded"]) > 0
        decoded["mask"] = tf.cond(has_mask, lambda: decode_mask(record["mask/encoded"], image_size),
                                  lambda: boxes_to_mask(record["boxes"], image_size))
        return decoded

    def augment(self, images: tf.Tensor, batch: Mapping[str, tf.Tensor], seed: tf.Tensor
                ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        images, masks = augment_batch(images, tf.cast(batch["mask"], tf.float32), seed)
        return images, {"mask": masks}

    def target(self, batch: Mapping[str, tf.Tensor]) -> Any:
        return tf.cast(batch["mask"], tf.float32)

    def augment_in_step(self, images: tf.Tensor, targets: Any, seed: tf.Tensor) -> tuple[tf.Tensor, Any]:
        return augment_batch(images, targets, seed)

    # training ---------------------------------------------------------------------

    def per_example_loss(self, targets: Any, outputs: Any) -> tf.Tensor:
        predictions = tf.cast(mask_output(outputs), tf.float32)
        if self.loss == "binary_crossentropy":
            return losses.per_image_bce(targets, predictions)
        if self.loss == "bce_dice":
            return losses.per_image_bce_dice(targets, predictions)
        return losses.per_image_focal_dice_loss(targets, predictions, **self.loss_kwargs)

    def make_metrics(self) -> list:
        return [metrics.Dice(name="dice"), metrics.IoU(name="iou")]

    def metric_inputs(self, targets: Any, outputs: Any) -> tuple[Any, Any]:
        truth = targets["mask"] if isinstance(targets, Mapping) else targets
        return truth, tf.cast(mask_output(outputs), tf.float32)

    # evaluation -------------------------------------------------------------------

    def evaluate(self, predict: Predict, dataset: Any, context: EvalContext) -> EvalResult:
        ids, dice, iou, true_px, pred_px = [], [], [], [], []
        for images, targets, batch_ids in dataset:
            batch_ids = [i.decode("utf-8") for i in batch_ids.numpy()]
            probs = np.asarray(mask_output(predict(images)), np.float32)
            check_finite(probs, batch_ids)
            truth = np.asarray(targets["mask"] if isinstance(targets, Mapping) else targets)
            dice.append(dice_per_image(truth, probs, THRESHOLD, EMPTY_SCORE))
            iou.append(iou_per_image(truth, probs, THRESHOLD, EMPTY_SCORE))
            true_px.append((truth > 0.5).reshape(len(truth), -1).sum(axis=1))
            pred_px.append((probs >= THRESHOLD).reshape(len(probs), -1).sum(axis=1))
            ids.extend(batch_ids)
        if not ids:
            raise ValueError("no images in this split")
        dice_np, iou_np = np.concatenate(dice), np.concatenate(iou)
        metrics = {"num_images": len(ids), **segmentation_metrics(dice_np, iou_np)}
        rows = [[image_id, f"{d:.6f}", f"{j:.6f}", int(t), int(p)]
                for image_id, d, j, t, p in zip(ids, dice_np, iou_np, np.concatenate(true_px), np.concatenate(pred_px))]
        if context.plots and context.num_examples > 0:
            self._plot_examples(predict, dataset, ids, dice_np, context)
        return EvalResult(metrics, ["image_id", "dice", "iou", "true_pixels", "predicted_pixels"], rows)

    def bootstrap_inputs(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> BootstrapInputs | None:
        """Per-image Dice and IoU (``dice``, ``iou`` columns): intervals of their means."""
        header = list(header)
        if "dice" not in header or "iou" not in header:
            return None
        dice = np.array([float(row[header.index("dice")]) for row in rows])
        iou = np.array([float(row[header.index("iou")]) for row in rows])
        return BootstrapInputs(mean_dice_iou, dice, iou, {})

    def _plot_examples(self, predict: Predict, dataset: Any, ids: list[str], dice: np.ndarray,
                       context: EvalContext) -> None:
        """Images at evenly spaced ranks of Dice (best → worst), read again and predicted again."""
        from caaxr_tf.plots import plot_segmentation_examples

        order = np.argsort(-np.nan_to_num(dice, nan=-1.0), kind="stable")
        count = min(context.num_examples, len(order))
        picks = sorted({int(order[i]) for i in np.linspace(0, len(order) - 1, count).round().astype(int)},
                       key=lambda position: -np.nan_to_num(dice[position], nan=-1.0))
        wanted = {position: rank for rank, position in enumerate(picks)}
        images: list[Any] = [None] * len(picks)
        masks: list[Any] = [None] * len(picks)
        position = 0
        for batch_images, batch_targets, _ in dataset:
            batch_masks = batch_targets["mask"] if isinstance(batch_targets, Mapping) else batch_targets
            size = int(batch_images.shape[0])
            for offset in range(size):
                if position + offset in wanted:
                    rank = wanted[position + offset]
                    images[rank] = batch_images[offset].numpy()
                    masks[rank] = batch_masks[offset].numpy()
            position += size
            if position > max(picks):
                break
        stacked = np.stack(images)
        predictions = np.asarray(mask_output(predict(stacked)), np.float32)
        plot_segmentation_examples(
            stacked, np.stack(masks), predictions, [ids[p] for p in picks], [float(dice[p]) for p in picks],
            context.path("examples", "png"),
            f"{context.title}\nbest to worst Dice; ground truth green, prediction red (p ≥ {THRESHOLD})",
            threshold=THRESHOLD,
        )

    def format_metrics(self, metrics: Mapping[str, Any]) -> list[str]:
        return [
            f"  Dice  {format_value(metrics['dice'])}  (std over images {format_value(metrics['dice_std'])})",
            f"  IoU   {format_value(metrics['iou'])}  (std over images {format_value(metrics['iou_std'])})",
        ]

    def baselines(self, protocol_dir: Path, split: str, fold: int, subsets: Sequence[str]
                  ) -> dict[str, dict[str, dict[str, Any]]]:
        """DICE and IoU of an empty and an all-ones mask on the split (and each subset), scored
        exactly as a model is: a model has learnt something only well above both."""
        return {subset or "": self._constant_scores(protocol_dir, split, fold, subset or None)
                for subset in ["", *subsets]}

    def _constant_scores(self, protocol_dir: Path, split: str, fold: int, subset: str | None,
                         batch_size: int = 32) -> dict[str, dict[str, Any]]:
        dataset = make_dataset(protocol_dir, split, fold=fold, batch_size=batch_size, task=self, training=False,
                               augment=False, cache=False, subset=subset)
        scores: dict[str, tuple[list, list]] = {name: ([], []) for name in CONSTANT_PREDICTIONS}
        for _, targets in dataset:
            truth = np.asarray(targets["mask"] if isinstance(targets, Mapping) else targets)
            for name, value in CONSTANT_PREDICTIONS.items():
                constant = np.full(truth.shape, value, np.float32)
                scores[name][0].append(dice_per_image(truth, constant, THRESHOLD, EMPTY_SCORE))
                scores[name][1].append(iou_per_image(truth, constant, THRESHOLD, EMPTY_SCORE))
        result = {}
        for name, (dice, iou) in scores.items():
            if not dice:
                raise ValueError(f"no images in the {split} split of {protocol_dir}")
            dice_np, iou_np = np.concatenate(dice), np.concatenate(iou)
            result[name] = {"num_images": int(len(dice_np)), "dice": float(dice_np.mean()), "iou": float(iou_np.mean())}
        return result

    def metric_columns(self, subsets: Sequence[str] = ()) -> list[str]:
        columns = ["num_images", "dice", "iou"]
        for subset in subsets:
            columns += [f"num_images_{subset}", f"dice_{subset}", f"iou_{subset}"]
        return columns

    def paper_columns(self, subsets: Sequence[str] = ()) -> list[tuple[str, str]]:
        return [("dice", "DICE"), ("iou", "IoU")] + [(f"dice_{s}", f"DICE ({s} subset)") for s in subsets]

    def row_from_metrics(self, metrics: Mapping[str, Any],
                         subset_metrics: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        row = {"num_images": metrics.get("num_images"), "dice": metrics.get("dice"), "iou": metrics.get("iou")}
        for subset, values in (subset_metrics or {}).items():
            row[f"num_images_{subset}"] = values.get("num_images")
            row[f"dice_{subset}"] = values.get("dice")
            row[f"iou_{subset}"] = values.get("iou")
        return row

    def describe_metrics(self) -> str:
        return f"per-image Dice and IoU (threshold {THRESHOLD}), averaged over the test images"

    # serving ----------------------------------------------------------------------

    def serving_outputs(self, outputs: Any) -> dict[str, tf.Tensor]:
        """``mask`` [N, S, S, 1]: per-pixel probabilities (every entry of a dict output)."""
        if isinstance(outputs, Mapping):
            return super().serving_outputs(outputs)
        return {"mask": tf.cast(tf.convert_to_tensor(outputs), tf.float32)}

    def prediction_record(self, outputs: Mapping[str, np.ndarray], index: int) -> dict[str, Any]:
        mask = outputs["mask"][index]
        return {"mask_area_fraction": round(float(np.mean(mask >= THRESHOLD)), 6), "mask_threshold": THRESHOLD}

    def overlay(self, pixels: np.ndarray, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The mask tinted red and outlined over the model's input."""
        from caaxr_tf.plots import mask_overlay

        return mask_overlay(pixels, outputs["mask"][..., 0], THRESHOLD)

    def check_outputs(self, outputs: Mapping[str, Any]) -> None:
        if "mask" not in outputs:
            raise ValueError("a segmentation export must output `mask`")
