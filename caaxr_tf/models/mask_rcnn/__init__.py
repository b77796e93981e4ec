"""Mask R-CNN with an FPN for the CAAXR abnormality boxes (registered as `maskrcnn`).

    from caaxr_tf.models import build_model
    model = build_model("maskrcnn", weights="none")            # ResNet50-FPN, 1 class
    losses = model.compute_losses(images, targets)             # training: losses["loss"]
    outputs = model(images)                                    # inference: mask, boxes, scores, ...
"""

from caaxr_tf.models.mask_rcnn.anchors import level_anchors, pyramid_anchors
from caaxr_tf.models.mask_rcnn.boxes import (
    DEFAULT_BOX_WEIGHTS,
    box_area,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    iou_matrix,
)
from caaxr_tf.models.mask_rcnn.model import LOSS_NAMES, MaskRCNN, build_maskrcnn
from caaxr_tf.models.mask_rcnn.roi_align import MultiLevelRoIAlign, paste_masks, roi_align, roi_levels
from caaxr_tf.models.mask_rcnn.targets import box_mask_targets, rpn_targets, sample_rois

__all__ = [
    "DEFAULT_BOX_WEIGHTS",
    "LOSS_NAMES",
    "MaskRCNN",
    "MultiLevelRoIAlign",
    "box_area",
    "box_mask_targets",
    "build_maskrcnn",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "iou_matrix",
    "level_anchors",
    "paste_masks",
    "pyramid_anchors",
    "roi_align",
    "roi_levels",
    "rpn_targets",
    "sample_rois",
]
