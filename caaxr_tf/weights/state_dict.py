"""Reading PyTorch state dicts as numpy arrays.

* ``.safetensors``: through ``safetensors.numpy`` when installed, else a small built-in
  reader of the format (8-byte header length, JSON header, raw little-endian tensors), so
  no PyTorch is needed.
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``: through ``torch.load`` (PyTorch must be installed;
  a clear error otherwise). A pickled whole model (the torchxrayvision downloads are
  ``torch.save(model)``) is unpickled only with ``trusted=True`` (it runs code from the file),
  and needs the package that defined the model (``torchxrayvision``) importable.
* ``.npz``: arrays keyed by tensor name.

Wrappers are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state": ...}``) and a
``module.`` prefix (DataParallel) is stripped.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np


class StateDictError(ValueError):
    """A checkpoint cannot be read as a state dict."""


_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U8": "u1", "BOOL": "?",
}
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a numpy array (BF16 is refused by name)."""
    path = Path(path)
    try:
        from safetensors.numpy import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        try:
            return {key: np.asarray(value) for key, value in load_file(str(path)).items()}
        except Exception as error:  # noqa: BLE001 - a corrupt file: one line naming it
            raise StateDictError(f"{path}: not a readable safetensors file ({error})") from None
    data = path.read_bytes()
    if len(data) < 8:
        raise StateDictError(f"{path}: not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as error:
        raise StateDictError(f"{path}: not a safetensors file (bad header: {error})") from None
    body = data[8 + length :]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise StateDictError(f"{path}: tensor {key} has dtype {info['dtype']}, which numpy cannot read")
        start, end = info["data_offsets"]
        tensors[key] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"]).copy()
    return tensors


def _to_numpy(value: Any) -> np.ndarray | None:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    return None


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a pickled nn.Module
        obj = obj.state_dict()
    for key in ("state_dict", "model_state", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
        if isinstance(obj, dict) and key in obj and hasattr(obj[key], "state_dict"):
            obj = obj[key].state_dict()
            break
    if not isinstance(obj, dict):
        raise StateDictError(f"{path}: holds a {type(obj).__name__}, not a state dict or a model")
    return obj


def _first_line(error: BaseException) -> str:
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return (text.splitlines() or [type(error).__name__])[0][:200]


def read_torch(path: str | Path, *, trusted: bool = False) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise StateDictError(
            f"{path}: reading a PyTorch pickle needs torch, which is not installed; install torch, or "
            "convert the file to .safetensors elsewhere (safetensors.torch.save_file(model.state_dict(), ...))"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a pickled model needs weights_only=False
        if not trusted:
            raise StateDictError(
                f"{path}: not a plain state dict ({_first_line(error)}); if it is a pickled "
                "whole model from a source you trust (e.g. the torchxrayvision downloads), pass "
                "--trust-pickle (trusted=True): unpickling runs code from the file"
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except ModuleNotFoundError as missing:
            raise StateDictError(
                f"{path}: the pickled model needs the package {missing.name!r} (e.g. pip install torchxrayvision)"
            ) from None
    return _arrays(_unwrap(obj, path), path)


def _arrays(state: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in state.items():
        array = _to_numpy(value)
        if array is None:
            continue  # non-tensor entries (e.g. pickled attributes) are not weights
        key = key[len("module."):] if key.startswith("module.") else key
        arrays[key] = np.asarray(array)
    if not arrays:
        raise StateDictError(f"{path}: no tensors found")
    return arrays


def load_state_dict(path: str | Path, *, trusted: bool = False) -> dict[str, np.ndarray]:
    """The tensors of the checkpoint at ``path`` by name, as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        return _arrays(read_safetensors(path), path)
    if name.endswith(".npz"):
        with np.load(path) as data:
            return _arrays({key: data[key] for key in data.files}, path)
    if name.endswith(TORCH_SUFFIXES):
        return read_torch(path, trusted=trusted)
    raise StateDictError(
        f"{path}: unknown checkpoint format; expected .safetensors, .npz or a PyTorch file ({', '.join(TORCH_SUFFIXES)})"
    )


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` as a ``.safetensors`` file (numpy only; used for test fixtures)."""
    inverse = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        code = inverse.get(array.dtype.str) or inverse.get(array.dtype.str.replace("=", "<").replace("|", ""))
        if code is None:
            raise ValueError(f"{key}: dtype {array.dtype} cannot be written")
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[key] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))
