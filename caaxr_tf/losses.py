"""Per-image segmentation losses: binary cross-entropy, BCE + soft Dice, focal + Dice.

Each returns one value per image (a custom loop passes it to ``tf.nn.compute_average_loss``).

* ``per_image_bce``: binary cross-entropy averaged over an image's pixels (the CAAXR paper);
* ``per_image_bce_dice``: plus the image's soft Dice loss ``1 - (2 sum(y p) + 1) / (sum(y) + sum(p) + 1)``
  (helps where lesions cover a few percent of the image);
* ``per_image_focal_dice_loss``: the hybrid focal + Dice loss of Degerli et al. (2021), below.

Hybrid focal + Dice loss for infection segmentation (Degerli et al., 2021).

The focal term is Keras' own ``keras.losses.binary_focal_crossentropy`` (Lin et al., 2017:
``-w * (1 - p_t)**gamma * log(p_t)``, with ``w = alpha`` on foreground and ``1 - alpha`` on
background pixels when ``apply_class_balancing``), averaged over an image's pixels. The Dice
term is the soft Dice loss of the image, ``1 - (2 sum(y p) + smooth) / (sum(y) + sum(p) + smooth)``.

    loss(image) = focal_weight * focal(image) + dice_weight * dice(image)

`per_image_focal_dice_loss` returns one value per image (for a custom loop: pass it to
``tf.nn.compute_average_loss``, like ``per_example_loss`` in train.py); `FocalDiceLoss` is the
same as a serialisable ``keras.losses.Loss`` for ``model.compile``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import keras
from keras import ops

from caaxr_tf.config import ConfigError, from_mapping

PACKAGE = "caaxr_tf"

# --------------------------------------------------------------------------- loss options
# Each loss declares the options it takes (a run's ``loss_kwargs``), with their types and valid
# ranges, as a dataclass read strictly by caaxr_tf.config.from_mapping; a loss that is not in
# LOSS_OPTIONS takes none.

_NON_NEGATIVE = {"finite": True, "min": 0}


@dataclass(frozen=True)
class FocalDiceOptions:
    """``loss_kwargs`` of ``focal_dice`` (`per_image_focal_dice_loss`)."""

    focal_weight: float = field(default=1.0, metadata=_NON_NEGATIVE)
    dice_weight: float = field(default=1.0, metadata=_NON_NEGATIVE)
    alpha: float = field(default=0.25, metadata={"finite": True, "min": 0, "max": 1})
    gamma: float = field(default=2.0, metadata=_NON_NEGATIVE)
    apply_class_balancing: bool = True
    smooth: float = field(default=1.0, metadata={"finite": True, "gt": 0})

    def __post_init__(self):
        if self.focal_weight == 0 and self.dice_weight == 0:
            raise ConfigError("loss_kwargs: focal_weight and dice_weight cannot both be 0")


@dataclass(frozen=True)
class HuberOptions:
    """``loss_kwargs`` of ``huber`` (``keras.losses.huber``)."""

    delta: float = field(default=1.0, metadata={"finite": True, "gt": 0})


LOSS_OPTIONS: dict[str, type] = {"focal_dice": FocalDiceOptions, "huber": HuberOptions}


def option_names(loss: str) -> list[str]:
    """The ``loss_kwargs`` keys that ``loss`` takes (sorted; none for most losses)."""
    options = LOSS_OPTIONS.get(loss)
    return sorted(f.name for f in dataclasses.fields(options)) if options else []


def check_loss_options(loss: str, options: Mapping[str, Any] | None, task_losses: Sequence[str] = ()) -> None:
    """ConfigError naming the key, value and valid range (or the valid keys, with the closest
    one) when ``options`` are not what ``loss`` takes; ``task_losses`` (the task's other
    losses) are named when the options belong to one of them."""
    options = dict(options or {})
    declared = LOSS_OPTIONS.get(loss)
    if declared is None:
        if options:
            others = "; ".join(f"{name} takes {', '.join(option_names(name))}" for name in task_losses
                               if name != loss and option_names(name))
            raise ConfigError(f"loss {loss} takes no loss_kwargs, got {', '.join(map(str, options))}"
                              + (f" (of this task's losses, {others})" if others else ""))
        return
    try:
        from_mapping(declared, options, "loss_kwargs")
    except ConfigError as error:
        raise ConfigError(f"loss {loss}: {error}") from None


def per_image_bce(y_true, y_pred):
    """Binary cross-entropy of each image, averaged over its pixels: ``[N]``."""
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    return ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))


def per_image_bce_dice(y_true, y_pred, smooth: float = 1.0):
    """``per_image_bce`` plus the soft Dice loss of each image: ``[N]``."""
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    y_true = ops.cast(ops.convert_to_tensor(y_true), "float32")
    overlap = ops.sum(y_true * y_pred, axis=(1, 2, 3))
    total = ops.sum(y_true + y_pred, axis=(1, 2, 3))
    return per_image_bce(y_true, y_pred) + 1.0 - (2.0 * overlap + smooth) / (total + smooth)


def per_image_focal_dice_loss(
    y_true,
    y_pred,
    *,
    focal_weight: float = 1.0,
    dice_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    apply_class_balancing: bool = True,
    smooth: float = 1.0,
):
    """Focal + Dice loss of each image: ``[N]`` float32.

    Args:
        y_true: ground-truth masks ``[N, H, W, 1]`` (or ``[N, H, W]``) in {0, 1}.
        y_pred: predicted probabilities of the same shape.
        focal_weight, dice_weight: weights of the two terms (either may be 0).
        alpha, gamma, apply_class_balancing: of ``keras.losses.binary_focal_crossentropy``.
        smooth: added to the Dice numerator and denominator; keeps the loss of an empty
            mask predicted empty at 0 and its gradient finite.
    """
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    y_true = ops.cast(ops.convert_to_tensor(y_true), "float32")
    if len(y_true.shape) == len(y_pred.shape) - 1:
        y_true = ops.expand_dims(y_true, -1)
    if len(y_pred.shape) == 3:  # [N, H, W]: give the focal loss its channel axis
        y_true, y_pred = ops.expand_dims(y_true, -1), ops.expand_dims(y_pred, -1)
    if len(y_pred.shape) != 4 or len(y_true.shape) != 4:
        raise ValueError(f"expected masks [N, H, W(, 1)], got {y_true.shape} and {y_pred.shape}")
    pixel_axes = (1, 2)
    loss = ops.zeros_like(y_pred[:, 0, 0, 0])
    if focal_weight:
        focal = keras.losses.binary_focal_crossentropy(
            y_true, y_pred, apply_class_balancing=apply_class_balancing, alpha=alpha, gamma=gamma
        )  # [N, H, W]: the channel axis is averaged
        loss = loss + focal_weight * ops.mean(focal, axis=pixel_axes)
    if dice_weight:
        overlap = ops.sum(y_true * y_pred, axis=(1, 2, 3))
        total = ops.sum(y_true, axis=(1, 2, 3)) + ops.sum(y_pred, axis=(1, 2, 3))
        loss = loss + dice_weight * (1.0 - (2.0 * overlap + smooth) / (total + smooth))
    return loss


@keras.saving.register_keras_serializable(package=PACKAGE)
class FocalDiceLoss(keras.losses.Loss):
    """`per_image_focal_dice_loss` as a Keras loss (reduced over images by ``reduction``)."""

    def __init__(
        self,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        apply_class_balancing: bool = True,
        smooth: float = 1.0,
        reduction: str = "sum_over_batch_size",
        name: str = "focal_dice",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if focal_weight < 0 or dice_weight < 0 or focal_weight + dice_weight == 0:
            raise ValueError(
                f"focal_weight and dice_weight must be >= 0 and not both 0, got {focal_weight}, {dice_weight}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.focal_weight = float(focal_weight)
        self.dice_weight = float(dice_weight)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.apply_class_balancing = bool(apply_class_balancing)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        return per_image_focal_dice_loss(
            y_true,
            y_pred,
            focal_weight=self.focal_weight,
            dice_weight=self.dice_weight,
            alpha=self.alpha,
            gamma=self.gamma,
            apply_class_balancing=self.apply_class_balancing,
            smooth=self.smooth,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "focal_weight": self.focal_weight,
            "dice_weight": self.dice_weight,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "apply_class_balancing": self.apply_class_balancing,
            "smooth": self.smooth,
        }
