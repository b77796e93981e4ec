"""CAAXR models: segmentation (U-Net, UNet++, encoder U-Nets, SegNet, Mask R-CNN), COVID-19
classifiers (X-ray and CT slices) and severity-score regressors.

    from caaxr_tf.models import build_model, available_models, model_task
    model = build_model("mobilenetv2", num_classes=3, weights="none")

Every model takes raw grayscale images `[N, H, W, 1]` in 0..255 and does its
own normalisation, except the CT slice classifiers (`fpn_resnet50v2`, `resnet50v2`,
`xception`), which take raw CT values (HU + 1024) unscaled, as published.

Adding a model = one module in this package with a builder decorated `@register_model`:
`MODELS` (a `caaxr_tf.registry.Registry`) imports every module of the package, here, when
the package is imported (so the custom layers of saved models deserialize).
"""

from caaxr_tf.weights import layers as _imported_layers  # noqa: F401  (registers layers of imported weights)
from caaxr_tf.models.classifier import BACKBONES, build_classifier, build_pooled_backbone
from caaxr_tf.models.layers import (
    GrayscaleToRGB,
    ImageNetPreprocessing,
    MaxPoolingWithArgmax2D,
    MaxUnpooling2D,
)
from caaxr_tf.models.regressor import ClampOutputs, build_regressor, serving_regressor
from caaxr_tf.models.registry import MODELS, available_models, build_model, model_task, register_model
from caaxr_tf.models.resnet18 import ResNet18
from caaxr_tf.models.segnet import build_segnet
from caaxr_tf.models.unet import build_unet
from caaxr_tf.models.unet_encoder import ENCODERS, build_unet_encoder
from caaxr_tf.models.unetpp import build_unetpp
from caaxr_tf.models.weights import WeightsUnavailableError, load_weights_file

MODELS.discover()

__all__ = [
    "BACKBONES",
    "MODELS",
    "ClampOutputs",
    "ENCODERS",
    "GrayscaleToRGB",
    "ImageNetPreprocessing",
    "MaxPoolingWithArgmax2D",
    "MaxUnpooling2D",
    "ResNet18",
    "WeightsUnavailableError",
    "available_models",
    "build_classifier",
    "build_model",
    "build_pooled_backbone",
    "build_regressor",
    "build_segnet",
    "build_unet",
    "build_unet_encoder",
    "build_unetpp",
    "load_weights_file",
    "model_task",
    "register_model",
    "serving_regressor",
]
