"""Mask R-CNN (He et al., 2017) with an FPN backbone, for the CAAXR abnormality boxes.

    image [N, H, W, 1] 0..255
      -> backbone (ResNet50 / MobileNetV2) + FPN P2..P6 -> RPN (objectness, deltas per anchor)
      -> proposals: top-k, decode, NMS
      -> RoIAlign 7x7 -> box head (class, class-specific deltas)
      -> RoIAlign 14x14 -> mask head (28x28 per class)

Every annotated box is one instance whose mask is the filled box (as in the
paper), with class 1 ("abnormality") unless the targets carry `classes`.

`model(images)` returns a dict of fixed-size, zero-padded tensors:
`mask` [N, H, W, 1] (union of the instance masks scoring at least
`mask_score_threshold`), `boxes` [N, K, 4] normalised (ymin, xmin, ymax,
xmax), `scores` [N, K], `classes` [N, K] int32 (1..num_classes, 0 for
padding), `num_detections` [N] int32, `instance_masks` [N, K, 28, 28] (box
relative). `model.compute_losses(images, targets)` returns the training
losses; the training loop differentiates `"loss"`.

For the training loop: `"loss"` is a per-replica mean, so under
`tf.distribute` divide it by `num_replicas_in_sync` before taking gradients
(Keras optimizers sum them over replicas); run without XLA; export a model that
was never called with `input_signature=[keras.InputSpec((None, H, W, C), "float32")]`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import keras
import tensorflow as tf

from caaxr_tf.models.layers import PACKAGE, batch_norm_layers
from caaxr_tf.models.mask_rcnn.anchors import pyramid_anchors
from caaxr_tf.models.mask_rcnn.boxes import DEFAULT_BOX_WEIGHTS, box_area, clip_boxes, decode_boxes
from caaxr_tf.models.mask_rcnn.networks import (
    BACKBONES,
    MIN_LEVEL,
    application_kwargs,
    build_backbone,
    build_box_head,
    build_feature_network,
    build_mask_head,
)
from caaxr_tf.models.mask_rcnn.roi_align import MultiLevelRoIAlign, paste_masks
from caaxr_tf.models.mask_rcnn.targets import box_mask_targets, rpn_targets, sample_rois
from caaxr_tf.models.registry import register_model
from caaxr_tf.models.weights import (
    IMAGENET,
    NONE,
    call_with_imagenet_weights,
    load_weights_file,
    normalize_weights,
)

logger = logging.getLogger(__name__)

LOSS_NAMES = ("rpn_objectness", "rpn_box", "head_class", "head_box", "mask")
FREEZE_MODES = ("none", "bn", "all")


def smooth_l1(diff: tf.Tensor, beta: float = 1.0) -> tf.Tensor:
    """Smooth-L1 of `[..., 4]` delta errors, averaged over the 4 coordinates -> `[...]`.

    Averaging over coordinates and positives follows the Matterport
    implementation, whose SGD settings (lr 1e-3, momentum 0.9) the paper uses.
    """
    absolute = tf.abs(diff)
    return tf.reduce_mean(tf.where(absolute < beta, 0.5 * tf.square(diff) / beta, absolute - 0.5 * beta), axis=-1)


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of `values` where `mask` holds; 0 when it never does. NaNs outside the mask are dropped."""
    mask = tf.broadcast_to(mask, tf.shape(values))
    total = tf.reduce_sum(tf.where(mask, values, tf.zeros_like(values)))
    count = tf.reduce_sum(tf.cast(mask, values.dtype))
    return total / tf.maximum(count, 1.0)


def _train_infer_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a (training, inference) pair, got {value}")
    return value


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskRCNN(keras.Model):
    """Mask R-CNN with an FPN; see the module docstring for inputs and outputs.

    Args:
        num_classes: foreground classes (1: "abnormality").
        image_shape: `(H, W, C)` of the raw 0..255 input, H and W multiples of 32, C 1 or 3.
        backbone: "resnet50" or "mobilenetv2".
        alpha: MobileNetV2 width multiplier.
        backbone_bn_momentum: upper bound on the backbone's BatchNorm momentum
            (keras.applications use 0.99-0.999, with which the moving statistics of a
            backbone trained from scratch lag far behind in short runs and inference
            outputs drift; 0.9 is PyTorch's default).
        freeze_backbone: "none" (all trainable), "bn" (backbone BatchNorm
            layers frozen, in inference mode), "all" (backbone frozen).
        fpn_filters: channels of the pyramid, RPN and RoI features.
        anchor_sizes: anchor side in pixels for P2..P6 (one per level).
        anchor_ratios: anchor height / width ratios.
        rpn_pre_nms_top_k, rpn_post_nms_top_k: proposals kept before and after
            NMS, per image, as (training, inference).
        rpn_nms_threshold: IoU of the proposal NMS.
        rpn_samples_per_image, rpn_positive_fraction: anchors sampled for the RPN losses.
        rpn_iou_thresholds: (negative below, positive from) for anchors.
        rois_per_image, roi_positive_fraction: RoIs sampled for the heads.
        roi_iou_threshold: IoU from which a RoI is foreground.
        mask_rois_per_image: positive RoIs that train the mask head.
        pool_size, mask_pool_size: RoIAlign grids of the box and mask heads.
        sampling_ratio: RoIAlign sample points per bin and axis.
        box_head_units: width of the box head's two dense layers.
        mask_head_filters, mask_head_convs: the mask head's convolutions.
        max_detections: detections returned per image (K).
        detection_score_threshold: minimum class score of a detection.
        detection_nms_threshold: IoU of the per-class detection NMS.
        mask_score_threshold: minimum score of an instance in the union mask.
        box_weights: scale of the (dy, dx, dh, dw) regression targets.
        loss_weights: factor per loss component (see `LOSS_NAMES`), default 1.
    """

    def __init__(
        self,
        num_classes: int = 1,
        image_shape: Sequence[int] = (224, 224, 1),
        backbone: str = "resnet50",
        alpha: float = 1.0,
        freeze_backbone: str = "none",
        backbone_bn_momentum: float = 0.9,
        fpn_filters: int = 256,
        anchor_sizes: Sequence[float] = (16, 32, 64, 128, 256),
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_k: int | Sequence[int] = (2000, 1000),
        rpn_post_nms_top_k: int | Sequence[int] = (1000, 300),
        rpn_nms_threshold: float = 0.7,
        rpn_samples_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_iou_thresholds: Sequence[float] = (0.3, 0.7),
        rois_per_image: int = 128,
        roi_positive_fraction: float = 0.25,
        roi_iou_threshold: float = 0.5,
        mask_rois_per_image: int = 16,
        pool_size: int = 7,
        mask_pool_size: int = 14,
        sampling_ratio: int = 2,
        box_head_units: int = 1024,
        mask_head_filters: int = 256,
        mask_head_convs: int = 4,
        max_detections: int = 20,
        detection_score_threshold: float = 0.05,
        detection_nms_threshold: float = 0.5,
        mask_score_threshold: float = 0.5,
        box_weights: Sequence[float] = DEFAULT_BOX_WEIGHTS,
        loss_weights: Mapping[str, float] | None = None,
        name: str = "mask_rcnn",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        image_shape = tuple(int(s) for s in image_shape)
        if backbone not in BACKBONES:
            raise ValueError(f"unknown Mask R-CNN backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
        if len(image_shape) != 3 or image_shape[-1] not in (1, 3) or any(s % 32 for s in image_shape[:2]):
            raise ValueError(f"image_shape must be (H, W, 1 or 3) with H and W multiples of 32, got {image_shape}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes counts foreground classes and must be >= 1, got {num_classes}")
        if freeze_backbone not in FREEZE_MODES:
            raise ValueError(f"freeze_backbone must be one of {FREEZE_MODES}, got {freeze_backbone!r}")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size for each of P2..P6, got {anchor_sizes}")
        unknown = set(loss_weights or {}) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss_weights keys {sorted(unknown)}; known: {', '.join(LOSS_NAMES)}")
        train_proposals = _train_infer_pair(rpn_post_nms_top_k, "rpn_post_nms_top_k")[0]
        if rois_per_image > train_proposals:
            raise ValueError(
                f"rois_per_image ({rois_per_image}) cannot exceed the training proposals ({train_proposals})"
            )
        positive_slots = int(rois_per_image * roi_positive_fraction)
        if not 1 <= mask_rois_per_image <= positive_slots:
            raise ValueError(
                f"mask_rois_per_image must be in 1..{positive_slots} (the positive RoI slots), "
                f"got {mask_rois_per_image}"
            )

        self.num_classes = int(num_classes)
        self.image_shape = image_shape
        self.backbone_name = backbone
        self.alpha = float(alpha)
        self.freeze_backbone = freeze_backbone
        self.backbone_bn_momentum = float(backbone_bn_momentum)
        self.fpn_filters = int(fpn_filters)
        self.anchor_sizes = tuple(float(s) for s in anchor_sizes)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.rpn_pre_nms_top_k = _train_infer_pair(rpn_pre_nms_top_k, "rpn_pre_nms_top_k")
        self.rpn_post_nms_top_k = _train_infer_pair(rpn_post_nms_top_k, "rpn_post_nms_top_k")
        self.rpn_nms_threshold = float(rpn_nms_threshold)
        self.rpn_samples_per_image = int(rpn_samples_per_image)
        self.rpn_positive_fraction = float(rpn_positive_fraction)
        self.rpn_iou_thresholds = tuple(float(t) for t in rpn_iou_thresholds)
        self.rois_per_image = int(rois_per_image)
        self.roi_positive_fraction = float(roi_positive_fraction)
        self.roi_iou_threshold = float(roi_iou_threshold)
        self.mask_rois_per_image = int(mask_rois_per_image)
        self.pool_size = int(pool_size)
        self.mask_pool_size = int(mask_pool_size)
        self.sampling_ratio = int(sampling_ratio)
        self.box_head_units = int(box_head_units)
        self.mask_head_filters = int(mask_head_filters)
        self.mask_head_convs = int(mask_head_convs)
        self.max_detections = int(max_detections)
        self.detection_score_threshold = float(detection_score_threshold)
        self.detection_nms_threshold = float(detection_nms_threshold)
        self.mask_score_threshold = float(mask_score_threshold)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.loss_weights = {k: float((loss_weights or {}).get(k, 1.0)) for k in LOSS_NAMES}

        rgb_shape = image_shape[:2] + (3,)
        backbone_model = build_backbone(backbone, rgb_shape, alpha=self.alpha)
        for layer in batch_norm_layers(backbone_model):
            layer.momentum = min(layer.momentum, self.backbone_bn_momentum)
        if freeze_backbone == "all":
            backbone_model.trainable = False
        elif freeze_backbone == "bn":
            for layer in backbone_model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
        self.feature_network = build_feature_network(
            backbone_model,
            BACKBONES[backbone].preprocessing,
            image_shape,
            self.fpn_filters,
            len(self.anchor_ratios),
        )
        self.box_head = build_box_head(self.pool_size, self.fpn_filters, self.box_head_units, self.num_classes)
        self.mask_head = build_mask_head(
            self.mask_pool_size, self.fpn_filters, self.mask_head_filters, self.mask_head_convs, self.num_classes
        )
        image_size = image_shape[:2]
        self.box_roi_align = MultiLevelRoIAlign(
            self.pool_size, self.sampling_ratio, image_size, MIN_LEVEL, name="box_roi_align"
        )
        self.mask_roi_align = MultiLevelRoIAlign(
            self.mask_pool_size, self.sampling_ratio, image_size, MIN_LEVEL, name="mask_roi_align"
        )

        pyramid_sizes = [tuple(t.shape[1:3]) for t in self.feature_network.outputs[2:]]
        p5_h, p5_w = pyramid_sizes[-1]
        pyramid_sizes.append(((p5_h + 1) // 2, (p5_w + 1) // 2))  # P6: stride-2 pooling of P5
        self._anchors = pyramid_anchors(pyramid_sizes, image_size, self.anchor_sizes, self.anchor_ratios)
        num_anchors = self.feature_network.outputs[0].shape[1]
        if num_anchors != len(self._anchors):
            raise AssertionError(f"RPN predicts {num_anchors} anchors, the generator made {len(self._anchors)}")
        # CombinedNonMaxSuppression, CropAndResize and the per-level gathers have no XLA kernels.
        self.supports_jit = False
        self.build((None, *image_shape))

    def build(self, input_shape):
        # Every sub-network is a functional model, created (with its variables) in __init__.
        del input_shape

    @property
    def backbone(self) -> keras.Model:
        """The backbone inside the feature network (its layers are those of the keras application)."""
        return self.feature_network.get_layer("backbone")

    @property
    def anchors(self) -> tf.Tensor:
        """`[A, 4]` normalised anchors, in the order of the RPN outputs."""
        return tf.constant(self._anchors)

    # ------------------------------------------------------------------ shared steps

    def _features(self, images, training):
        rpn_logits, rpn_deltas, *pyramid = self.feature_network(images, training=training)
        return tf.cast(rpn_logits, tf.float32), tf.cast(rpn_deltas, tf.float32), pyramid

    def _proposals(self, rpn_logits, rpn_deltas, training: bool):
        """Top-k anchors by objectness, decoded, clipped and NMS-filtered: `([B, P, 4], valid [B, P])`."""
        stage = 0 if training else 1
        pre_nms = min(self.rpn_pre_nms_top_k[stage], int(rpn_logits.shape[1]))
        post_nms = self.rpn_post_nms_top_k[stage]
        rpn_logits, rpn_deltas = tf.stop_gradient(rpn_logits), tf.stop_gradient(rpn_deltas)
        logits, index = tf.math.top_k(rpn_logits, pre_nms, sorted=True)
        deltas = tf.gather(rpn_deltas, index, axis=1, batch_dims=1)
        anchors = tf.gather(self.anchors, index)
        boxes = clip_boxes(decode_boxes(deltas, anchors, self.box_weights))
        # Boxes that collapse to under a pixel after clipping are dropped (score 0 < threshold).
        min_size = 1.0 / max(self.image_shape[:2])
        big_enough = ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)
        scores = tf.where(big_enough, tf.sigmoid(logits), 0.0)
        nms = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :],
            scores[:, :, None],
            max_output_size_per_class=post_nms,
            max_total_size=post_nms,
            iou_threshold=self.rpn_nms_threshold,
            score_threshold=0.0,
            clip_boxes=False,
        )
        valid = tf.range(post_nms)[None, :] < nms.valid_detections[:, None]
        return tf.stop_gradient(nms.nmsed_boxes), valid

    def _box_head(self, pyramid, rois, training):
        batch, count = tf.shape(rois)[0], rois.shape[1]
        features = self.box_roi_align(pyramid, rois)
        features = tf.reshape(features, [-1, self.pool_size, self.pool_size, self.fpn_filters])
        logits, deltas = self.box_head(features, training=training)
        logits = tf.reshape(tf.cast(logits, tf.float32), [batch, count, self.num_classes + 1])
        deltas = tf.reshape(tf.cast(deltas, tf.float32), [batch, count, self.num_classes + 1, 4])
        return logits, deltas

    def _mask_logits(self, pyramid, rois, classes, training):
        """Mask logits `[B, R, m, m]` of each RoI's class (`classes` 1-based; 0 reads class 1)."""
        batch, count = tf.shape(rois)[0], rois.shape[1]
        features = self.mask_roi_align(pyramid, rois)
        features = tf.reshape(features, [-1, self.mask_pool_size, self.mask_pool_size, self.fpn_filters])
        logits = tf.cast(self.mask_head(features, training=training), tf.float32)  # [B*R, m, m, K]
        pick = tf.one_hot(tf.reshape(tf.maximum(classes - 1, 0), [-1]), self.num_classes)
        logits = tf.reduce_sum(logits * pick[:, None, None, :], axis=-1)
        size = 2 * self.mask_pool_size
        return tf.reshape(logits, [batch, count, size, size])

    # ------------------------------------------------------------------ inference

    def call(self, images, training=False):
        rpn_logits, rpn_deltas, pyramid = self._features(images, training)
        proposals, valid = self._proposals(rpn_logits, rpn_deltas, training=False)
        class_logits, box_deltas = self._box_head(pyramid, proposals, training)

        probs = tf.nn.softmax(class_logits, axis=-1)[:, :, 1:]  # [B, P, K]
        scores = probs * tf.cast(valid, tf.float32)[:, :, None]
        boxes = clip_boxes(decode_boxes(box_deltas[:, :, 1:], proposals[:, :, None, :], self.box_weights))
        nms = tf.image.combined_non_max_suppression(
            boxes,
            scores,
            max_output_size_per_class=self.max_detections,
            max_total_size=self.max_detections,
            iou_threshold=self.detection_nms_threshold,
            score_threshold=self.detection_score_threshold,
            clip_boxes=False,
        )
        num_detections = tf.cast(nms.valid_detections, tf.int32)
        detected = tf.range(self.max_detections)[None, :] < num_detections[:, None]
        det_boxes = tf.where(detected[..., None], nms.nmsed_boxes, 0.0)
        det_scores = tf.where(detected, nms.nmsed_scores, 0.0)
        det_classes = tf.where(detected, tf.cast(nms.nmsed_classes, tf.int32) + 1, 0)

        instance_masks = tf.sigmoid(self._mask_logits(pyramid, det_boxes, det_classes, training))
        size = 2 * self.mask_pool_size
        pasted = paste_masks(
            tf.reshape(instance_masks, [-1, size, size]), tf.reshape(det_boxes, [-1, 4]), self.image_shape[:2]
        )
        pasted = tf.reshape(pasted, [-1, self.max_detections, *self.image_shape[:2]])
        keep = detected & (det_scores >= self.mask_score_threshold)
        union = tf.reduce_max(pasted * tf.cast(keep, tf.float32)[:, :, None, None], axis=1)
        return {
            "mask": union[..., None],
            "boxes": det_boxes,
            "scores": det_scores,
            "classes": det_classes,
            "num_detections": num_detections,
            "instance_masks": instance_masks * tf.cast(detected, tf.float32)[:, :, None, None],
        }

    # ------------------------------------------------------------------ training

    def _ground_truth(self, targets):
        boxes = clip_boxes(tf.cast(targets["boxes"], tf.float32))
        count = tf.cast(tf.reshape(targets["num_boxes"], [-1]), tf.int32)
        valid = (tf.range(tf.shape(boxes)[1])[None, :] < count[:, None]) & (box_area(boxes) > 0.0)
        if "classes" in targets:
            classes = tf.clip_by_value(tf.cast(targets["classes"], tf.int32), 1, self.num_classes)
        else:
            classes = tf.ones(tf.shape(boxes)[:2], tf.int32)
        return boxes, classes, valid

    def compute_losses(self, images, targets: Mapping[str, tf.Tensor], training: bool = True) -> dict[str, tf.Tensor]:
        """Losses of one (per-replica) batch, each averaged over that batch.

        Args:
            images: `[B, H, W, C]` raw 0..255 images.
            targets: the detection targets of `caaxr_tf.data.pipeline.make_dataset`:
                `boxes` `[B, G, 4]` normalised (ymin, xmin, ymax, xmax), zero padded,
                `num_boxes` `[B]`, optionally `classes` `[B, G]` (1..num_classes;
                default 1). Other keys (e.g. `mask`) are ignored.
            training: passed to the networks (BatchNorm mode).

        Returns:
            `{"loss": weighted total, "rpn_objectness", "rpn_box", "head_class",
            "head_box", "mask"}`, float32 scalars.
        """
        gt_boxes, gt_classes, gt_valid = self._ground_truth(targets)
        rpn_logits, rpn_deltas, pyramid = self._features(images, training)

        rpn = rpn_targets(
            self.anchors,
            gt_boxes,
            gt_valid,
            self.rpn_samples_per_image,
            self.rpn_positive_fraction,
            self.rpn_iou_thresholds,
            self.box_weights,
        )
        objectness = tf.nn.sigmoid_cross_entropy_with_logits(labels=rpn.labels, logits=rpn_logits)
        rpn_box = smooth_l1(rpn_deltas - rpn.deltas)
        losses = {
            "rpn_objectness": _masked_mean(objectness, rpn.sampled),
            "rpn_box": _masked_mean(rpn_box, rpn.positive),
        }

        proposals, proposal_valid = self._proposals(rpn_logits, rpn_deltas, training=True)
        samples = sample_rois(
            proposals,
            proposal_valid,
            gt_boxes,
            gt_classes,
            gt_valid,
            self.rois_per_image,
            self.roi_positive_fraction,
            self.roi_iou_threshold,
            self.box_weights,
        )
        rois = tf.stop_gradient(samples.rois)
        class_logits, box_deltas = self._box_head(pyramid, rois, training)
        head_class = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=samples.classes, logits=class_logits)
        class_deltas = tf.gather(box_deltas, samples.classes, axis=2, batch_dims=2)  # [B, R, 4]
        head_box = smooth_l1(class_deltas - samples.deltas)
        losses["head_class"] = _masked_mean(head_class, samples.valid)
        losses["head_box"] = _masked_mean(head_box, samples.positive)

        # Positives fill the first slots, so the mask head sees the first `mask_rois_per_image`.
        count = self.mask_rois_per_image
        mask_rois = rois[:, :count]
        mask_logits = self._mask_logits(pyramid, mask_rois, samples.classes[:, :count], training)
        mask_targets = box_mask_targets(mask_rois, samples.gt_boxes[:, :count], 2 * self.mask_pool_size)
        mask_loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=mask_targets, logits=mask_logits)
        losses["mask"] = _masked_mean(mask_loss, samples.positive[:, :count, None, None])

        losses["loss"] = tf.add_n([self.loss_weights[name] * losses[name] for name in LOSS_NAMES])
        return losses

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "backbone": self.backbone_name,
            "alpha": self.alpha,
            "freeze_backbone": self.freeze_backbone,
            "backbone_bn_momentum": self.backbone_bn_momentum,
            "fpn_filters": self.fpn_filters,
            "anchor_sizes": list(self.anchor_sizes),
            "anchor_ratios": list(self.anchor_ratios),
            "rpn_pre_nms_top_k": list(self.rpn_pre_nms_top_k),
            "rpn_post_nms_top_k": list(self.rpn_post_nms_top_k),
            "rpn_nms_threshold": self.rpn_nms_threshold,
            "rpn_samples_per_image": self.rpn_samples_per_image,
            "rpn_positive_fraction": self.rpn_positive_fraction,
            "rpn_iou_thresholds": list(self.rpn_iou_thresholds),
            "rois_per_image": self.rois_per_image,
            "roi_positive_fraction": self.roi_positive_fraction,
            "roi_iou_threshold": self.roi_iou_threshold,
            "mask_rois_per_image": self.mask_rois_per_image,
            "pool_size": self.pool_size,
            "mask_pool_size": self.mask_pool_size,
            "sampling_ratio": self.sampling_ratio,
            "box_head_units": self.box_head_units,
            "mask_head_filters": self.mask_head_filters,
            "mask_head_convs": self.mask_head_convs,
            "max_detections": self.max_detections,
            "detection_score_threshold": self.detection_score_threshold,
            "detection_nms_threshold": self.detection_nms_threshold,
            "mask_score_threshold": self.mask_score_threshold,
            "box_weights": list(self.box_weights),
            "loss_weights": dict(self.loss_weights),
        }


def _load_imagenet_backbone(model: MaskRCNN) -> None:
    spec = BACKBONES[model.backbone_name]
    rgb_shape = model.image_shape[:2] + (3,)
    pretrained = call_with_imagenet_weights(
        model.backbone_name,
        lambda: spec.constructor(
            include_top=False,
            weights=IMAGENET,
            input_shape=rgb_shape,
            **application_kwargs(model.backbone_name, model.alpha),
        ),
    )
    backbone = model.backbone
    for layer in pretrained.layers:
        if layer.weights:
            backbone.get_layer(layer.name).set_weights(layer.get_weights())


@register_model("maskrcnn", task="detection")
def build_maskrcnn(
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] = (224, 224, 1),
    weights: str = NONE,
    backbone: str = "resnet50",
    **kwargs: Any,
) -> MaskRCNN:
    """Registry builder for Mask R-CNN.

    Args:
        num_classes: foreground classes; `None` means 1 ("abnormality").
        input_shape: `(H, W, C)` of the raw input (H, W multiples of 32).
        weights: `"none"` (random), `"imagenet"` (keras.applications weights of
            the backbone) or a weights file of the backbone application
            (`.weights.h5`, `.keras` or the notop `.h5`). To restore a whole
            trained model use `keras.saving.load_model` instead.
        backbone: "resnet50" or "mobilenetv2".
        **kwargs: `MaskRCNN` arguments. `freeze_backbone` defaults to "none"
            for random weights and "bn" (frozen BatchNorm statistics) for
            pretrained ones.
    """
    weights = normalize_weights(weights)
    if backbone not in BACKBONES:
        raise ValueError(f"unknown Mask R-CNN backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    kwargs.setdefault("freeze_backbone", "none" if weights == NONE else "bn")
    model = MaskRCNN(
        num_classes=1 if num_classes is None else int(num_classes),
        image_shape=tuple(input_shape),
        backbone=backbone,
        **kwargs,
    )
    if weights == IMAGENET:
        _load_imagenet_backbone(model)
    elif weights != NONE:
        load_weights_file(model.backbone, weights, what=f"{backbone} backbone")
    logger.info("maskrcnn: %s backbone, weights %s, freeze_backbone=%s", backbone, weights, model.freeze_backbone)
    return model
