"""Atomic file writes: an output appears under its final name complete, or not at all.

Every writer in the project goes through ``atomic_path``: the content is written to a hidden
temporary file in the same folder (same file system, so the final ``os.replace`` is atomic)
and renamed when complete; on any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick the format from
    it keep working); rename it to ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        if temporary.is_dir():
            import shutil

            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """A JSON-safe copy: NaN and infinities become None, numpy scalars and arrays Python values."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalars and arrays
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2) -> Path:
    """``data`` as JSON (non-finite numbers as null), written atomically."""
    return write_text_atomic(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")
