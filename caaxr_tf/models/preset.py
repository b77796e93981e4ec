"""KerasHub-style presets: a folder that rebuilds a trained model with one call.

    PRESET/config.json        {"module", "class_name", "config": <the Keras model config>, caaxr fields}
    PRESET/model.weights.h5   the weights (Keras 3)
    PRESET/metadata.json      caaxr/keras versions, the run it came from, task and classes, weights provenance

    from caaxr_tf.models.preset import load_preset
    model = load_preset("presets/densenet121-2class")

The config is the functional model's own serialisation, so preprocessing layers (ImageNet or an
imported network's, e.g. torchxrayvision's) come back exactly. Missing or inconsistent files are
a `PresetError` naming the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import keras

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
PRESET_FORMAT = "caaxr-preset/1"


class PresetError(ValueError):
    """A preset folder is incomplete or inconsistent."""


def save_preset(model: keras.Model, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a preset folder at ``path`` (created; existing files are replaced)."""
    from caaxr_tf import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": PRESET_FORMAT, **keras.saving.serialize_keras_object(model)}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    model.save_weights(str(path / WEIGHTS_FILE))
    meta = {"format": PRESET_FORMAT, "caaxr_tf": __version__, "keras": keras.__version__,
            "parameter_count": int(model.count_params()), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **dict(metadata or {})}
    (path / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def save_run_preset(run_dir: str | Path, path: str | Path, which: str = "best") -> Path:
    """A preset of a trained run (its best or final model), with the run's settings as metadata."""
    from caaxr_tf.run_files import load_run_config, load_run_model

    config = load_run_config(run_dir)
    model = load_run_model(run_dir, which)
    metadata = {"run_dir": str(Path(run_dir).resolve()), "checkpoint": which,
                **{k: config.get(k) for k in ("task", "model", "protocol", "fold", "class_names", "image_size",
                                              "weights", "model_kwargs") if k in config}}
    weights = str(config.get("weights") or "none")
    if weights not in ("none", "imagenet"):
        from caaxr_tf.weights.convert import read_sidecar

        metadata["imported_weights"] = read_sidecar(weights)
    return save_preset(model, path, metadata)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PresetError(f"preset incomplete: {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise PresetError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != PRESET_FORMAT:
        raise PresetError(f"{path}: not a {PRESET_FORMAT} file")
    return data


def load_preset_metadata(path: str | Path) -> dict[str, Any]:
    return _read_json(Path(path) / METADATA_FILE)


def load_preset(path: str | Path, *, compile: bool = False) -> keras.Model:
    """The model of the preset folder ``path``, weights loaded (one call, no run folder)."""
    import caaxr_tf.models  # noqa: F401  (registers the custom layers)
    from caaxr_tf.models.weights import load_weights_file

    path = Path(path)
    config = _read_json(path / CONFIG_FILE)
    _read_json(path / METADATA_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise PresetError(f"preset incomplete: {weights} is missing")
    config = {k: v for k, v in config.items() if k != "format"}
    try:
        model = keras.saving.deserialize_keras_object(config)
    except Exception as error:  # noqa: BLE001 - any failure to rebuild names the file
        raise PresetError(f"{path / CONFIG_FILE}: cannot rebuild the model ({error})") from None
    try:
        load_weights_file(model, weights, what=f"preset {path.name}")
    except ValueError as error:
        raise PresetError(f"{weights}: {error}") from None
    return model
