"""PyTorch DenseNet / ResNet (basic-block) state dicts to this project's Keras networks.

Sources: ``torchxrayvision`` (``xrv.models.DenseNet``), ``torchvision`` (``densenet121``,
``resnet18``) and ``timm`` (``densenet121``, ``resnet18``), whose tensor names agree.

Targets: the backbones of `caaxr_tf.models.classifier` (``keras.applications.DenseNet121``,
`caaxr_tf.models.resnet18.ResNet18`), or, for other depths/widths (``--model densenet`` /
``resnet``: the reduced networks of the CI fixtures), the same layouts built here with the
same layer names. Mapping (PyTorch -> Keras layer):

=========================================================  ===============================
``features.conv0`` / ``features.norm0``                     ``conv1_conv`` / ``conv1_bn``
``features.denseblockB.denselayerL.norm1|conv1|norm2|conv2``  ``conv{B+1}_block{L}_0_bn|_1_conv|_1_bn|_2_conv``
``features.transitionT.norm|conv``                          ``pool{T+1}_bn|_conv``
``features.norm5``                                          ``bn``
``conv1`` / ``bn1``                                         ``stem_conv`` / ``stem_bn``
``layerS.B.conv1|bn1|conv2|bn2|downsample.0|downsample.1``  ``stageS_block{B+1}_1_conv|_1_bn|_2_conv|_2_bn|_proj_conv|_proj_bn``
``classifier`` / ``fc``                                     the head (``Dense``), kept beside
=========================================================  ===============================

Layouts: conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]`` (transpose (2, 3, 1, 0)); BN
``weight, bias, running_mean, running_var`` -> ``gamma, beta, moving_mean, moving_variance``
(``num_batches_tracked`` is dropped); linear ``[out, in]`` -> ``[in, out]``. BN epsilon is set to
PyTorch's 1e-5 (Keras' DenseNet uses 1.001e-5). Padding: both Keras networks pad explicitly
(``ZeroPadding2D(3)`` before the 7x7/2 stem conv, ``ZeroPadding2D(1)`` before the 3x3/2 max pool,
which sees only ReLU outputs >= 0, so zero padding equals PyTorch's -inf padding), so outputs
match PyTorch's ``padding=3`` / ``padding=1`` exactly rather than Keras ``'same'``.

A one-channel stem (torchxrayvision) is spread over the three channels the Keras backbones take
(kernel / 3 on each), which is exact for the grey images the CAAXR models replicate to RGB.

Every tensor must be used and every Keras variable set, with matching shapes; otherwise a
`WeightConversionError` lists the unmapped, missing and mis-shaped tensors. Nothing is guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from caaxr_tf.weights.layers import IMAGENET_MEAN, IMAGENET_STD, OperatingPointCalibration, preprocessing_layer
from caaxr_tf.weights.state_dict import load_state_dict

SOURCES = ("torchxrayvision", "timm", "torchvision")
MODELS = ("densenet121", "resnet18", "densenet", "resnet")
TORCH_BN_EPSILON = 1e-5
SIDECAR_FORMAT = "caaxr-imported-weights/1"
DENSENET121 = {"blocks": [6, 12, 24, 16], "growth_rate": 32, "num_init_features": 64, "bn_size": 4}
RESNET18 = {"blocks": [2, 2, 2, 2], "widths": [64, 128, 256, 512], "stem_filters": 64}
UNSUPPORTED = {
    "resnet50": "Keras' ResNet50 (keras.applications) strides in the first 1x1 conv of a block (ResNet v1), "
    "torchvision/timm's in the 3x3 conv (v1.5): the architectures differ, so no exact import exists",
}


class WeightConversionError(ValueError):
    """A state dict does not map one to one onto the Keras network."""


# --------------------------------------------------------------------------- architecture


def infer_architecture(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """The family and hyper-parameters of a DenseNet or basic-block ResNet state dict."""
    if "features.conv0.weight" in state:
        blocks: dict[int, int] = {}
        for key in state:
            match = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key)
            if match:
                b, l = int(match.group(1)), int(match.group(2))
                blocks[b] = max(blocks.get(b, 0), l)
        if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
            raise WeightConversionError(f"DenseNet state dict with dense blocks {sorted(blocks)}; expected 1..N")
        conv2 = _find(state, r"features\.denseblock1\.denselayer1\.conv\.?2\.weight")
        conv1 = _find(state, r"features\.denseblock1\.denselayer1\.conv\.?1\.weight")
        growth = int(state[conv2].shape[0])
        return {
            "family": "densenet",
            "blocks": [blocks[b] for b in sorted(blocks)],
            "growth_rate": growth,
            "num_init_features": int(state["features.conv0.weight"].shape[0]),
            "bn_size": int(state[conv1].shape[0]) // growth,
            "in_channels": int(state["features.conv0.weight"].shape[1]),
            "num_classes": int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else None,
        }
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        if any(re.match(r"layer\d+\.\d+\.conv3\.", key) for key in state):
            raise WeightConversionError(
                "bottleneck ResNet (resnet50/101/152) state dict: " + UNSUPPORTED["resnet50"])
        blocks, widths = [], []
        stage = 1
        while f"layer{stage}.0.conv1.weight" in state:
            count = 1 + max(int(m.group(1)) for key in state if (m := re.match(rf"layer{stage}\.(\d+)\.", key)))
            blocks.append(count)
            widths.append(int(state[f"layer{stage}.0.conv1.weight"].shape[0]))
            stage += 1
        return {
            "family": "resnet",
            "blocks": blocks,
            "widths": widths,
            "stem_filters": int(state["conv1.weight"].shape[0]),
            "in_channels": int(state["conv1.weight"].shape[1]),
            "num_classes": int(state["fc.weight"].shape[0]) if "fc.weight" in state else None,
        }
    raise WeightConversionError(
        "not a DenseNet (features.conv0.weight) or ResNet (conv1.weight, layer1.0.conv1.weight) state dict; "
        f"first keys: {', '.join(list(state)[:5])}")


def _find(state: dict, pattern: str) -> str:
    for key in state:
        if re.fullmatch(pattern, key):
            return key
    raise WeightConversionError(f"no tensor matches {pattern}")


def check_model_name(model: str, architecture: dict[str, Any]) -> None:
    """``--model densenet121`` / ``resnet18`` must be exactly that network."""
    if model in UNSUPPORTED:
        raise WeightConversionError(f"{model}: {UNSUPPORTED[model]}")
    if model not in MODELS:
        raise WeightConversionError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
    family = architecture["family"]
    if not model.startswith(family):
        raise WeightConversionError(f"--model {model}, but the checkpoint is a {family}")
    standard = {"densenet121": DENSENET121, "resnet18": RESNET18}.get(model)
    if standard:
        differs = {k: architecture[k] for k in standard if architecture[k] != standard[k]}
        if differs:
            raise WeightConversionError(
                f"--model {model}, but the checkpoint has {differs} (expected {standard}); "
                f"use --model {family} for another depth or width")


def _densenet_conv_block(x, growth_rate: int, bn_size: int, name: str):
    y = layers.BatchNormalization(epsilon=TORCH_BN_EPSILON, name=f"{name}_0_bn")(x)
    y = layers.Activation("relu", name=f"{name}_0_relu")(y)
    y = layers.Conv2D(bn_size * growth_rate, 1, use_bias=False, name=f"{name}_1_conv")(y)
    y = layers.BatchNormalization(epsilon=TORCH_BN_EPSILON, name=f"{name}_1_bn")(y)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = layers.Conv2D(growth_rate, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
    return layers.Concatenate(name=f"{name}_concat")([x, y])


def build_densenet(blocks, growth_rate=32, num_init_features=64, bn_size=4, input_shape=(224, 224, 3),
                   name="densenet", **_ignored) -> keras.Model:
    """A DenseNet laid out and named like ``keras.applications.DenseNet121`` (features only:
    final BN + ReLU, no pooling), with any block configuration, growth rate and stem width."""
    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.ZeroPadding2D(((3, 3), (3, 3)), name="zero_padding2d")(inputs)
    x = layers.Conv2D(num_init_features, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = layers.BatchNormalization(epsilon=TORCH_BN_EPSILON, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(((1, 1), (1, 1)), name="zero_padding2d_1")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    for index, count in enumerate(blocks):
        for layer in range(count):
            x = _densenet_conv_block(x, growth_rate, bn_size, name=f"conv{index + 2}_block{layer + 1}")
        if index != len(blocks) - 1:
            p = f"pool{index + 2}"
            x = layers.BatchNormalization(epsilon=TORCH_BN_EPSILON, name=f"{p}_bn")(x)
            x = layers.Activation("relu", name=f"{p}_relu")(x)
            x = layers.Conv2D(x.shape[-1] // 2, 1, use_bias=False, name=f"{p}_conv")(x)
            x = layers.AveragePooling2D(2, strides=2, name=f"{p}_pool")(x)
    x = layers.BatchNormalization(epsilon=TORCH_BN_EPSILON, name="bn")(x)
    x = layers.Activation("relu", name="relu")(x)
    return keras.Model(inputs, x, name=name)


def build_resnet(blocks, widths, stem_filters=64, input_shape=(224, 224, 3), name="resnet", **_ignored):
    """A basic-block ResNet laid out and named like `caaxr_tf.models.resnet18.ResNet18`."""
    from caaxr_tf.models.resnet18 import _conv_bn, basic_block

    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv_bn(inputs, stem_filters, 7, 2, name="stem", relu=True)
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    for stage, (count, filters) in enumerate(zip(blocks, widths), start=1):
        for block in range(1, count + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = basic_block(x, filters, strides, name=f"stage{stage}_block{block}")
    return keras.Model(inputs, x, name=name)


def set_torch_bn_epsilon(model: keras.Model) -> None:
    from caaxr_tf.models.layers import batch_norm_layers

    for layer in batch_norm_layers(model):
        layer.epsilon = TORCH_BN_EPSILON


def build_backbone(model: str, architecture: dict[str, Any], input_size: int = 224) -> keras.Model:
    """The Keras network the state dict maps onto (3-channel input, features without pooling)."""
    shape = (input_size, input_size, 3)
    if model == "densenet121":
        net = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=shape)
    elif model == "resnet18":
        from caaxr_tf.models.resnet18 import ResNet18

        net = ResNet18(include_top=False, input_shape=shape)
    elif model == "densenet":
        net = build_densenet(input_shape=shape, **{k: architecture[k] for k in DENSENET121})
    else:
        net = build_resnet(input_shape=shape, **{k: architecture[k] for k in RESNET18})
    set_torch_bn_epsilon(net)
    return net


# --------------------------------------------------------------------------- name mapping

_BN = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}
_DENSE_PARTS = {"norm1": "0_bn", "conv1": "1_conv", "norm2": "1_bn", "conv2": "2_conv"}
_RES_PARTS = {"conv1": "1_conv", "bn1": "1_bn", "conv2": "2_conv", "bn2": "2_bn",
              "downsample.0": "proj_conv", "downsample.1": "proj_bn"}
HEAD = "__head__"


def keras_target(family: str, key: str) -> tuple[str, int] | None:
    """``(keras layer name, variable index)`` of torch tensor ``key``; None if it has no place."""
    module, _, param = key.rpartition(".")
    if family == "densenet":
        module = re.sub(r"(denselayer\d+\.(?:norm|conv))\.([12])$", r"\1\2", module)  # old torchvision names
        patterns = [
            (r"features\.conv0", lambda m: "conv1_conv"),
            (r"features\.norm0", lambda m: "conv1_bn"),
            (r"features\.denseblock(\d+)\.denselayer(\d+)\.(norm1|conv1|norm2|conv2)",
             lambda m: f"conv{int(m.group(1)) + 1}_block{m.group(2)}_{_DENSE_PARTS[m.group(3)]}"),
            (r"features\.transition(\d+)\.(norm|conv)",
             lambda m: f"pool{int(m.group(1)) + 1}_{'bn' if m.group(2) == 'norm' else 'conv'}"),
            (r"features\.norm5", lambda m: "bn"),
            (r"classifier", lambda m: HEAD),
        ]
    else:
        patterns = [
            (r"conv1", lambda m: "stem_conv"),
            (r"bn1", lambda m: "stem_bn"),
            (r"layer(\d+)\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)",
             lambda m: f"stage{m.group(1)}_block{int(m.group(2)) + 1}_{_RES_PARTS[m.group(3)]}"),
            (r"fc", lambda m: HEAD),
        ]
    for pattern, target in patterns:
        match = re.fullmatch(pattern, module)
        if match:
            name = target(match)
            if name.endswith(("_bn", "bn")) and name != HEAD:
                return (name, _BN[param]) if param in _BN else None
            if param == "weight":
                return name, 0
            if param == "bias":
                return name, 1
            return None
    return None


def _layout(value: np.ndarray, target_shape: tuple) -> np.ndarray:
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
        value = value.transpose(2, 3, 1, 0)
        if value.shape[2] == 1 and len(target_shape) == 4 and target_shape[2] == 3:
            value = np.repeat(value / 3.0, 3, axis=2)  # grey stem spread over RGB (exact for grey input)
    elif value.ndim == 2:  # linear [out, in] -> [in, out]
        value = value.T
    return value


@dataclass
class ImportedWeights:
    """A converted checkpoint: the Keras backbone, the head and the source's contract."""

    backbone: keras.Model
    head_kernel: np.ndarray | None
    head_bias: np.ndarray | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def build_source_model(self) -> keras.Model:
        """The whole imported network as one Keras model taking raw 0..255 grey pixels
        ``[N, S, S, 1]``: the source's preprocessing, the backbone, global average pooling
        (output ``features``), the source's linear head (``logits``) and, for torchxrayvision,
        sigmoid + operating-point calibration (``probabilities``)."""
        return source_model(self.backbone, self.head_kernel, self.head_bias, self.metadata)

    def save(self, out: str | Path) -> Path:
        """Write ``OUT.weights.h5`` (the backbone, loadable by ``--weights``), ``OUT.import.json``
        (the contract) and ``OUT.head.npz`` (the source's linear head)."""
        out = Path(out)
        if not out.name.endswith(".weights.h5"):
            raise ValueError(f"--out must end in .weights.h5 (the backbone weights file), got {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.backbone.save_weights(str(out))
        if self.head_kernel is not None:
            np.savez(head_path(out), kernel=self.head_kernel, bias=self.head_bias)
        sidecar_path(out).write_text(json.dumps(self.metadata, indent=2) + "\n", encoding="utf-8")
        return out


def sidecar_path(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name[: -len(".weights.h5")] + ".import.json")


def head_path(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name[: -len(".weights.h5")] + ".head.npz")


def preprocessing_contract(source: str, in_channels: int, input_size: int) -> dict[str, Any]:
    """What the source network was trained on, as a `PixelNormalization` of 0..255 pixels."""
    if source == "torchxrayvision":
        return {"name": "torchxrayvision", "channels": in_channels, "image_size": input_size,
                "value_range": [-1024.0, 1024.0], "mean": [127.5], "std": [127.5 / 1024.0],
                "description": "grey 0..255 -> (2 * x / 255 - 1) * 1024 (xrv.datasets.normalize(img, 255)), "
                               f"one channel, {input_size} px (torchxrayvision trained on centre-cropped images; "
                               "the CAAXR pipeline resizes the whole image)"}
    return {"name": "imagenet", "channels": 3, "image_size": input_size, "value_range": "imagenet-standardised",
            "mean": [255.0 * m for m in IMAGENET_MEAN], "std": [255.0 * s for s in IMAGENET_STD],
            "description": "RGB 0..255 -> (x / 255 - ImageNet mean) / ImageNet std; grey images replicated to RGB"}


def _xrv_labels(checkpoint: Path, state: dict) -> tuple[list[str] | None, list[float] | None, str | None]:
    """torchxrayvision's class names and op_threshs for a downloaded checkpoint file (by name)."""
    try:
        import torchxrayvision as xrv
    except ImportError:
        return None, None, None
    for key, info in xrv.models.model_urls.items():
        if Path(info.get("weights_url", "")).name == checkpoint.name and "labels" in info:
            return list(info["labels"]), list(info.get("op_threshs") or []) or None, key
    return None, None, None


def import_weights(
    source: str,
    checkpoint: str | Path,
    model: str = "densenet121",
    *,
    input_size: int = 224,
    class_names: list[str] | None = None,
    thresholds: list[float | None] | None = None,
    trusted: bool = False,
    state: dict[str, np.ndarray] | None = None,
) -> ImportedWeights:
    """Convert ``checkpoint`` (a PyTorch state dict from ``source``) onto the Keras ``model``.

    ``class_names`` / ``thresholds`` name the head's outputs and torchxrayvision's operating
    points; for a torchxrayvision download they are looked up in ``xrv.models.model_urls``
    when torchxrayvision is installed, and an ``op_threshs`` tensor in the state dict is used.
    """
    if source not in SOURCES:
        raise WeightConversionError(f"unknown source {source!r}; one of {', '.join(SOURCES)}")
    checkpoint = Path(checkpoint)
    if state is None:
        state = load_state_dict(checkpoint, trusted=trusted)
    state = dict(state)
    op_threshs = state.pop("op_threshs", None)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    architecture = infer_architecture(state)
    check_model_name(model, architecture)
    if source == "torchxrayvision" and architecture["family"] != "densenet":
        raise WeightConversionError("torchxrayvision checkpoints imported here are DenseNets")
    net = build_backbone(model, architecture, input_size)
    family = architecture["family"]

    targets: dict[str, dict[int, np.ndarray]] = {}
    unmapped, misshaped, head = [], [], {}
    for key, value in state.items():
        target = keras_target(family, key)
        if target is None:
            unmapped.append(f"{key} {list(value.shape)}")
            continue
        name, index = target
        if name == HEAD:
            head[index] = np.asarray(value, np.float32)
            continue
        targets.setdefault(name, {})[index] = (key, value)
    assignments, missing = [], []
    for layer in net.layers:
        if not layer.weights:
            continue
        given = targets.pop(layer.name, {})
        for index, variable in enumerate(layer.weights):
            if index not in given:
                missing.append(f"{layer.name}/{variable.name} {list(variable.shape)}")
                continue
            key, value = given.pop(index)
            value = _layout(value, tuple(variable.shape))
            if tuple(value.shape) != tuple(variable.shape):
                misshaped.append(f"{key} {list(np.shape(state[key]))} -> {layer.name}/{variable.name} "
                                 f"{list(variable.shape)}")
                continue
            assignments.append((variable, value))
        unmapped += [f"{key} (no variable {index} in {layer.name})" for index, (key, _) in given.items()]
    unmapped += [f"{key} (no Keras layer {name})" for name, given in targets.items() for key, _ in given.values()]
    if unmapped or missing or misshaped:
        parts = [f"{label} ({len(items)}): {'; '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
                 for label, items in (("unmapped tensors", unmapped), ("missing tensors", missing),
                                      ("mis-shaped tensors", misshaped)) if items]
        raise WeightConversionError(f"{checkpoint}: does not map onto {model}: " + " | ".join(parts))
    for variable, value in assignments:
        variable.assign(value)

    kernel = head[0].T if 0 in head else None
    bias = head.get(1, np.zeros(kernel.shape[1], np.float32) if kernel is not None else None)
    labels, xrv_thresholds, xrv_key = (None, None, None)
    if source == "torchxrayvision":
        labels, xrv_thresholds, xrv_key = _xrv_labels(checkpoint, state)
    if thresholds is None:
        if op_threshs is not None:
            thresholds = [float(v) for v in np.asarray(op_threshs).ravel()]
        else:
            thresholds = xrv_thresholds
    class_names = class_names or labels
    outputs = None if kernel is None else int(kernel.shape[1])
    for what, values in (("class names", class_names), ("thresholds", thresholds)):
        if values is not None and outputs is not None and len(values) != outputs:
            raise WeightConversionError(f"{len(values)} {what} for a head of {outputs} outputs")
    thresholds = None if thresholds is None else [None if v is None or not np.isfinite(v) else float(v)
                                                  for v in thresholds]
    metadata = {
        "format": SIDECAR_FORMAT,
        "source": source,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": _sha256(checkpoint) if checkpoint.is_file() else None,
        **({"torchxrayvision_weights": xrv_key} if xrv_key else {}),
        "model": model,
        "backbone": model if model in ("densenet121", "resnet18") else None,
        "architecture": architecture,
        "input_size": input_size,
        "bn_epsilon": TORCH_BN_EPSILON,
        "preprocessing": preprocessing_contract(source, architecture["in_channels"], input_size),
        "head": None if kernel is None else {
            "outputs": outputs,
            "activation": "sigmoid" if source == "torchxrayvision" else "softmax",
            "class_names": class_names,
            "thresholds": thresholds if source == "torchxrayvision" else None,
            "calibration": "torchxrayvision op_norm" if source == "torchxrayvision" and thresholds else None,
        },
    }
    return ImportedWeights(net, kernel, bias, metadata)


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_model(backbone: keras.Model, kernel, bias, metadata: dict[str, Any]) -> keras.Model:
    """See `ImportedWeights.build_source_model`."""
    size = int(metadata.get("input_size", 224))
    pre = metadata["preprocessing"]
    inputs = keras.Input(shape=(size, size, 1), name="image")
    x = layers.Concatenate(name="to_rgb")([inputs, inputs, inputs])
    x = preprocessing_layer(pre)(x)
    features = layers.GlobalAveragePooling2D(name="features")(backbone(x))
    outputs = {"features": features}
    head = metadata.get("head")
    if kernel is not None:
        dense = layers.Dense(kernel.shape[1], name="logits")
        logits = dense(features)
        dense.set_weights([kernel, bias])
        outputs["logits"] = logits
        if head and head.get("activation") == "sigmoid":
            probabilities = layers.Activation("sigmoid", name="sigmoid")(logits)
            if head.get("thresholds"):
                probabilities = OperatingPointCalibration(head["thresholds"], name="calibration")(probabilities)
        else:
            probabilities = layers.Activation("softmax", name="softmax")(logits)
        outputs["probabilities"] = probabilities
    return keras.Model(inputs, outputs, name=f"imported_{metadata.get('model', 'model')}")


# --------------------------------------------------------------------------- reading back


def read_sidecar(weights: str | Path) -> dict[str, Any] | None:
    """The import contract beside a ``.weights.h5`` written by `ImportedWeights.save`, or None."""
    weights = Path(weights)
    if not weights.name.endswith(".weights.h5"):
        return None
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if data.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {SIDECAR_FORMAT!r}")
    for key in ("preprocessing", "backbone", "bn_epsilon"):
        if key not in data:
            raise ValueError(f"{path}: missing {key!r}")
    return data


def load_imported(weights: str | Path) -> ImportedWeights:
    """Rebuild an `ImportedWeights` from the files `ImportedWeights.save` wrote."""
    from caaxr_tf.models.weights import load_weights_file

    metadata = read_sidecar(weights)
    if metadata is None:
        raise FileNotFoundError(f"{sidecar_path(weights)} (the import contract of {weights}) not found")
    net = build_backbone(metadata["model"], metadata["architecture"], int(metadata["input_size"]))
    load_weights_file(net, weights, what=metadata["model"])
    kernel = bias = None
    if metadata.get("head"):
        path = head_path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path} (the head of {weights}) not found")
        with np.load(path) as data:
            kernel, bias = data["kernel"], data["bias"]
    return ImportedWeights(net, kernel, bias, metadata)


_BN_NAMES = ("weight", "bias", "running_mean", "running_var")


def export_state_dict(net: keras.Model, family: str) -> dict[str, np.ndarray]:
    """The inverse of the import: a Keras backbone's variables under PyTorch names and layouts
    (``torchvision`` naming). Round-trips exactly through `import_weights`; used by tests to
    make full-size state dicts without torch."""
    inverse_dense = {v: k for k, v in _DENSE_PARTS.items()}
    inverse_res = {v: k for k, v in _RES_PARTS.items()}
    state = {}
    for layer in net.layers:
        if not layer.weights:
            continue
        name = layer.name
        if family == "densenet":
            match = re.fullmatch(r"conv(\d+)_block(\d+)_(0_bn|1_conv|1_bn|2_conv)", name)
            pool = re.fullmatch(r"pool(\d+)_(bn|conv)", name)
            if name in ("conv1_conv", "conv1_bn", "bn"):
                module = {"conv1_conv": "features.conv0", "conv1_bn": "features.norm0", "bn": "features.norm5"}[name]
            elif match:
                module = (f"features.denseblock{int(match.group(1)) - 1}.denselayer{match.group(2)}."
                          f"{inverse_dense[match.group(3)]}")
            elif pool:
                module = f"features.transition{int(pool.group(1)) - 1}.{'norm' if pool.group(2) == 'bn' else 'conv'}"
            else:
                raise WeightConversionError(f"no PyTorch name for Keras layer {name}")
        else:
            match = re.fullmatch(r"stage(\d+)_block(\d+)_(1_conv|1_bn|2_conv|2_bn|proj_conv|proj_bn)", name)
            if name in ("stem_conv", "stem_bn"):
                module = {"stem_conv": "conv1", "stem_bn": "bn1"}[name]
            elif match:
                module = f"layer{match.group(1)}.{int(match.group(2)) - 1}.{inverse_res[match.group(3)]}"
            else:
                raise WeightConversionError(f"no PyTorch name for Keras layer {name}")
        values = [np.asarray(v) for v in layer.get_weights()]
        if isinstance(layer, layers.BatchNormalization):
            state.update({f"{module}.{n}": v for n, v in zip(_BN_NAMES, values)})
        else:
            state[f"{module}.weight"] = values[0].transpose(3, 2, 0, 1)
            if len(values) > 1:
                state[f"{module}.bias"] = values[1]
    return state
