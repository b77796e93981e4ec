"""Inference in reduced precision: bfloat16 on CPUs that have it, float16 on GPUs.

    model = with_precision(model, "bfloat16")     # float32 in, float32 out, bf16 inside

API (small on purpose: evaluate, export and the CT patient path call one function):

* ``PRECISIONS`` — ``("float32", "bfloat16", "float16")``, the ``--precision`` choices.
* ``check_precision(precision)`` — raises ``PrecisionError`` (a ``ValueError``) naming why the
  device cannot run it: bfloat16 needs a CPU with ``avx512_bf16`` or ``amx_bf16`` (or a GPU);
  float16 needs a GPU (no CPU kernel is faster than float32, oneDNN has none on this
  hardware). ``CAAXR_PRECISIONS`` (comma list, e.g. ``float32``) overrides the detection, so
  that the refusal can be tested on any machine.
* ``with_precision(model, precision)`` — a copy of ``model`` whose layers compute under the
  Keras mixed policy ``mixed_<precision>`` (variables stay float32, the weights are copied
  bit for bit); layers producing the model's outputs compute in float32 and every floating
  output is float32. BatchNormalization computes its statistics in float32 under mixed
  policies (Keras 3). ``float32`` returns ``model`` itself. Functional and Sequential models
  only: a subclassed model (Mask R-CNN) is a ``PrecisionError``.
* ``tolerance(precision)`` — the largest absolute difference allowed between the outputs in
  ``precision`` and in float32 for outputs in [0, 1] (probabilities, masks); used by the
  export check.
* ``precision_tag(precision)`` — ``""`` for float32, else ``"_bfloat16"``/``"_float16"``
  (evaluation file names, so that the float32 metrics are never overwritten).

Tolerance (docs/BENCHMARKS.md, "bfloat16 inference"): bfloat16 keeps 8 significand bits,
unit round-off u = 2^-8 ≈ 3.9e-3 per rounding. Inputs and activations are rounded once per
layer; to first order the relative errors of L rounded layers add, in the worst case L·u and
with independent signs about √L·u. A sigmoid or softmax output p = σ(z) moves by
|Δp| ≤ p(1-p)|Δz| ≤ |Δz|/4. The deepest models here have L ≈ 120 (DenseNet-121) and logits
|z| ≲ 8, so √L·u·|z|/4 ≈ 0.086 is the scale of a bound, and a random-image export check
sees far less (max 0.004–0.02 on the tiny runs). ``BFLOAT16_TOLERANCE`` = 2^-4 = 0.0625
(16 u) is the stated tolerance; float16 (11 significand bits, u = 2^-11) gets 2^-7.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

PRECISIONS = ("float32", "bfloat16", "float16")
OVERRIDE_VARIABLE = "CAAXR_PRECISIONS"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FLOAT32_TOLERANCE = 1e-4
BFLOAT16_TOLERANCE = 2.0 ** -4
FLOAT16_TOLERANCE = 2.0 ** -7
TOLERANCES = {"float32": FLOAT32_TOLERANCE, "bfloat16": BFLOAT16_TOLERANCE, "float16": FLOAT16_TOLERANCE}


class PrecisionError(ValueError):
    """This device cannot run the precision asked for."""


def precision_tag(precision: str | None) -> str:
    return "" if precision in (None, "float32") else f"_{precision}"


def tolerance(precision: str) -> float:
    _check_name(precision)
    return TOLERANCES[precision]


def _check_name(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


@lru_cache(maxsize=1)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _gpus() -> list[Any]:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def _gpu_supports_bfloat16(gpus: list[Any]) -> bool:
    import tensorflow as tf

    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        if tuple(capability) >= (8, 0):
            return True
    return False


def supported_precisions() -> tuple[str, ...]:
    """The precisions this device runs (``CAAXR_PRECISIONS`` overrides the detection)."""
    override = os.environ.get(OVERRIDE_VARIABLE)
    if override is not None:
        return tuple(name.strip() for name in override.split(",") if name.strip())
    gpus = _gpus()
    supported = ["float32"]
    if (gpus and _gpu_supports_bfloat16(gpus)) or cpu_flags() & set(CPU_BF16_FLAGS):
        supported.append("bfloat16")
    if gpus:
        supported.append("float16")
    return tuple(supported)


def check_precision(precision: str) -> None:
    """Raise ``PrecisionError`` unless this device runs ``precision`` (see the module docstring)."""
    _check_name(precision)
    supported = supported_precisions()
    if precision in supported:
        return
    override = f" ({OVERRIDE_VARIABLE}={os.environ[OVERRIDE_VARIABLE]!r})" if OVERRIDE_VARIABLE in os.environ else ""
    if precision == "float16":
        raise PrecisionError(
            f"--precision float16 needs a GPU; this device has none{override}. On CPUs use bfloat16 "
            f"(CPUs with {' or '.join(CPU_BF16_FLAGS)}) or float32")
    raise PrecisionError(
        f"--precision bfloat16 needs a CPU with {' or '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo (or an NVIDIA GPU "
        f"of compute capability 8.0 or later); this device has neither{override}: without them bfloat16 is "
        f"emulated and slower than float32. Use --precision float32")


def _output_layers(model) -> set[int]:
    ids = set()
    for tensor in getattr(model, "outputs", None) or []:
        history = getattr(tensor, "_keras_history", None)
        if history is not None:
            ids.add(id(history[0]))
    return ids


def with_precision(model, precision: str = "float32", *, check: bool = True):
    """A copy of ``model`` computing in ``precision`` (float32 inputs and outputs; see the
    module docstring). ``check`` first refuses a precision this device cannot run."""
    _check_name(precision)
    if check:
        check_precision(precision)
    if precision == "float32":
        return model
    import keras

    policy = f"mixed_{precision}"
    outputs = _output_layers(model)

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if id(layer) in outputs else policy
        return layer.__class__.from_config(config)

    if not isinstance(model, keras.Sequential) and not _is_functional(model):
        # Mask R-CNN: box decoding, NMS and ROIAlign in bfloat16 would move boxes by up to a
        # pixel at 224 px (8 significand bits); not cloned, not cast.
        raise PrecisionError(f"--precision {precision} needs a functional Keras model; "
                             f"{type(model).__name__} (a subclassed model) runs in float32 only")
    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return _float32_outputs(copy)


def _is_functional(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def _float32_outputs(model):
    """``model`` itself when its outputs are float32 already, else wrapped in a cast."""
    import keras

    tensors = keras.tree.flatten(model.outputs)
    if all(str(tensor.dtype) in ("float32", "int32", "int64", "bool") for tensor in tensors):
        return model
    inputs = model.inputs
    results = model(inputs[0] if len(inputs) == 1 else inputs)
    cast = keras.tree.map_structure(
        lambda t: keras.ops.cast(t, "float32") if "float" in str(t.dtype) else t, results)
    return keras.Model(inputs, cast, name=model.name)


def compute_dtypes(model) -> dict[str, int]:
    """How many layers compute in each dtype (for tests and reports)."""
    counts: dict[str, int] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer.weights or not getattr(layer, "_layers", None):
            counts[layer.compute_dtype] = counts.get(layer.compute_dtype, 0) + 1
    return counts


def add_precision_argument(parser, what: str = "the model") -> None:
    """``--precision float32|bfloat16|float16`` on a CLI parser."""
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help=f"compute {what} in this precision, float32 inputs and outputs (bfloat16: CPUs with "
                             f"avx512_bf16/amx_bf16 or GPUs; float16: GPUs only)")
