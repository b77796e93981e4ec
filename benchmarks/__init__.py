"""Benchmarks of caaxr-tf against reference implementations (a PyTorch peer, the published CT
notebooks, decode limits). Run from a checkout: ``python tools/benchmark.py ...`` (the ``bench``
extra: ``pip install -e '.[bench]'``). Not part of the installed package: the wheel ships
``caaxr_tf`` only; benchmarks import from ``caaxr_tf``, never the reverse.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark child interpreter (``python -m benchmarks....``): the
    checkout first on ``PYTHONPATH`` so ``benchmarks`` imports from any working folder, and
    TensorFlow's C++ log quiet."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *([path] if path else [])]),
            "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
