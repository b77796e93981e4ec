"""Helpers shared by the metrics: weights per example and thresholded masks."""

from __future__ import annotations

from keras import ops


def _per_example_weights(sample_weight, n_like):
    """Weights of shape ``[N]`` (ones when ``sample_weight`` is None).

    ``n_like`` is any tensor with the batch as its first axis. Accepted weights
    are a scalar, ``[N]`` or ``[N, 1, ..., 1]``.
    """
    first = n_like[(slice(None),) + (0,) * (len(n_like.shape) - 1)]
    ones = ops.ones_like(ops.cast(first, "float32"))
    if sample_weight is None:
        return ones
    sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    if len(sample_weight.shape) > 1:
        trailing = sample_weight.shape[1:]
        if any(dim is not None and dim != 1 for dim in trailing):
            raise ValueError(
                "Only one weight per example is supported (shape [N] or [N, 1, ...]); "
                f"received sample_weight with shape {sample_weight.shape}."
            )
        sample_weight = ops.reshape(sample_weight, (-1,))
    return ones * sample_weight


def _binary_masks(y_true, y_pred, threshold: float):
    """Float 0/1 masks of equal rank; ``y_true`` may lack the trailing channel axis."""
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    if len(y_true.shape) == len(y_pred.shape) - 1:
        y_true = ops.expand_dims(y_true, -1)
    elif len(y_pred.shape) == len(y_true.shape) - 1:
        y_pred = ops.expand_dims(y_pred, -1)
    truth = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
    pred = ops.cast(ops.cast(y_pred, "float32") >= threshold, "float32")
    return truth, pred
