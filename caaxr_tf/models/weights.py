"""Interpreting the `weights` argument: `"none"`, `"imagenet"` or a file path.

Errors raised here are one line long and name the way out (`--weights PATH` or
`--weights none`); the long Keras/urllib tracebacks they replace are dropped.
"""

from __future__ import annotations

import io
import os
import traceback
import urllib.error
import warnings
import zipfile
from pathlib import Path
from typing import Callable, TypeVar

import h5py
import keras

NONE = "none"
IMAGENET = "imagenet"
WEIGHT_SUFFIXES = (".weights.h5", ".keras", ".h5")

T = TypeVar("T")


class WeightsUnavailableError(RuntimeError):
    """Requested pretrained weights cannot be obtained (e.g. offline, not cached)."""


def normalize_weights(weights: str | os.PathLike | None) -> str:
    """`None`/"none" -> "none"; "imagenet" stays; anything else must be an existing weights file.

    Checked before any model is built, so a typo fails fast.
    """
    if weights is None:
        return NONE
    weights = os.fspath(weights)
    if weights.lower() in (NONE, IMAGENET):
        return weights.lower()
    _check_weights_path(Path(weights))
    return weights


def _check_weights_path(path: Path) -> None:
    if not path.name.lower().endswith(WEIGHT_SUFFIXES):
        raise ValueError(
            f"weights must be 'none', 'imagenet' or a {'/'.join(WEIGHT_SUFFIXES)} file; got {str(path)!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")


def check_segmentation_args(model_name: str, num_classes: int | None, weights) -> str:
    """Validate `num_classes`/`weights` for a one-mask segmentation model; returns normalised weights."""
    if num_classes not in (None, 1):
        raise ValueError(
            f"{model_name} predicts one binary mask; num_classes must be None or 1, got {num_classes}"
        )
    weights = normalize_weights(weights)
    if weights == IMAGENET:
        raise ValueError(
            f"{model_name} has no ImageNet weights; use weights='none' or a weights file of the whole model"
        )
    return weights


def keras_cache_dir() -> str:
    """Where keras.applications caches downloaded weights (`<keras home>/models`)."""
    try:
        from keras.src.backend.config import keras_home  # private, but the one get_file uses

        home = keras_home()
    except ImportError:  # pragma: no cover - layout of a future Keras
        home = os.environ.get("KERAS_HOME", "~/.keras")
    return os.path.join(os.path.expanduser(home), "models")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raised_by_download(exc: BaseException) -> bool:
    """True when `exc` came out of `keras.utils.get_file` or the network stack."""
    if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return True
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        if code.co_name == "get_file" and code.co_filename.endswith("file_utils.py"):
            return True
    return False


def call_with_imagenet_weights(what: str, factory: Callable[[], T]) -> T:
    """Run `factory` (which fetches ImageNet weights) and turn a failed download into one clear error."""
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a download failure
        if not _raised_by_download(exc):
            raise
        message = (
            f"ImageNet weights for {what} are unavailable: they could not be downloaded "
            f"and are not in the Keras cache ({keras_cache_dir()}) [{_one_line(exc, 160)}]. "
            "Use --weights PATH (a .weights.h5/.h5/.keras file of the backbone) or --weights none."
        )
    raise WeightsUnavailableError(message)


def _count_saved_variables(path: Path) -> int | None:
    """Number of layer variables stored in a Keras 3 `.weights.h5` / `.keras` file (None if unknown)."""
    name = path.name.lower()
    if name.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" not in archive.namelist():
                return None
            handle = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    elif name.endswith(".weights.h5"):
        handle = h5py.File(path, "r")
    else:
        return None
    count = 0

    def visit(item_name: str, item) -> None:
        nonlocal count
        if isinstance(item, h5py.Dataset) and item_name.startswith("layers/"):
            count += 1

    with handle:
        if "layers" not in handle:
            return None
        handle.visititems(visit)
    return count


def load_weights_file(model: keras.Model, weights_path: str | os.PathLike, *, what: str) -> None:
    """Load `weights_path` into `model`, raising a one-line `ValueError` if it does not fit.

    Accepts Keras 3 `.weights.h5` and `.keras` files and legacy `.h5` weight
    files (the format of the keras.applications downloads). A file whose
    variables do not match `model` one to one is rejected, including files with
    extra variables, which Keras would otherwise load partially without a word.
    """
    path = Path(weights_path)
    _check_weights_path(path)
    hint = f"{path} does not match the {what} architecture"
    try:
        with warnings.catch_warnings():
            # Keras 3.15 warns about its internal `_operations_by_depth` cache of
            # every called functional model; completeness is checked below instead.
            warnings.filterwarnings("ignore", message="Skipping nested container", category=UserWarning)
            model.load_weights(str(path))
    except (ValueError, KeyError, TypeError, OSError, IndexError) as exc:
        message = f"{hint}: {_one_line(exc)}"
    else:
        stored = _count_saved_variables(path)
        if stored is None or stored == len(model.weights):
            return
        message = f"{hint}: the file holds {stored} variables, the model has {len(model.weights)}"
    raise ValueError(message)
