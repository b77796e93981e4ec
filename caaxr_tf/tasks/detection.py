"""Instance detection with masks (Mask R-CNN on the segmentation protocols): the model computes
its own losses from the boxes; it is evaluated and served like a segmentation model through
its union mask, with its detections added."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from caaxr_tf.tasks.base import register_task
from caaxr_tf.tasks.segmentation import SegmentationTask

# What the model reports of its losses (history.csv columns ``loss_<name>``).
LOSS_COMPONENTS = ("rpn_objectness", "rpn_box", "head_class", "head_box", "mask")
DETECTION_OUTPUTS = ("boxes", "scores", "classes")


@register_task
class DetectionTask(SegmentationTask):
    """Boxes (and the union mask) of a segmentation protocol; ``max_boxes`` pads each image's
    boxes to a fixed count."""

    name = "detection"
    protocol_task = "segmentation"
    model_task = "detection"
    losses = ("model",)
    owns_loss = True
    supports_augmentation = False  # boxes would not follow the geometric augmentation
    loss_components = LOSS_COMPONENTS

    @classmethod
    def config_sections(cls) -> tuple[str, ...]:
        return ("segmentation", "detection")

    def __init__(self, class_names: Sequence[str], *, loss: str | None = None,
                 loss_kwargs: Mapping[str, Any] | None = None, target_names: Sequence[str] = (),
                 max_boxes: int = 32):
        super().__init__(class_names, loss=loss, loss_kwargs=loss_kwargs, target_names=target_names)
        self.max_boxes = int(max_boxes)

    def decode(self, record: Mapping[str, tf.Tensor], image_size: int) -> dict[str, tf.Tensor]:
        decoded = super().decode(record, image_size)
        boxes = tf.gather(record["boxes"], [1, 0, 3, 2], axis=-1)[: self.max_boxes]  # ymin, xmin, ymax, xmax
        count = tf.shape(boxes)[0]
        decoded["boxes"] = tf.pad(boxes, [[0, self.max_boxes - count], [0, 0]])
        decoded["num_boxes"] = count
        return decoded

    def target(self, batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"mask": tf.cast(batch["mask"], tf.float32), "boxes": batch["boxes"], "num_boxes": batch["num_boxes"]}

    def per_example_loss(self, targets: Any, outputs: Any) -> tf.Tensor:
        raise TypeError("the detection model computes its own losses (model.compute_losses)")

    def prediction_record(self, outputs: Mapping[str, np.ndarray], index: int) -> dict[str, Any]:
        """The union mask's area, ``num_detections`` and each detection's box (normalised ymin,
        xmin, ymax, xmax), score and class, cut to ``num_detections``. Per-detection images
        (``instance_masks``) stay out of the JSON."""
        record = super().prediction_record(outputs, index)
        count = int(np.asarray(outputs["num_detections"][index]).reshape(-1)[0])
        record["num_detections"] = count
        for key in DETECTION_OUTPUTS:
            if key in outputs:
                value = np.asarray(outputs[key][index])[:count]
                record[key] = np.round(value.astype(np.float64), 6).tolist() if value.dtype.kind == "f" else value.tolist()
        return record

    reported_outputs = ("mask", "num_detections", "instance_masks", *DETECTION_OUTPUTS)
