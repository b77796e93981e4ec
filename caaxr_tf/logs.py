"""TensorFlow's C++ log level: the one place that sets its default (no imports beyond ``os``).

The ``caaxr`` runner (``caaxr_tf.cli``) calls ``quiet_tensorflow_logs`` before it imports a verb;
the modules with a ``python -m`` entry that import TensorFlow at the top call it before that
import too, so ``python -m caaxr_tf.train`` is as quiet as ``caaxr train``. A value the user set
(``TF_CPP_MIN_LOG_LEVEL=0``) is kept.
"""

from __future__ import annotations

import os

TF_LOG_LEVEL_DEFAULT = "2"  # warnings and errors only: no oneDNN / CUDA start-up notices


def quiet_tensorflow_logs() -> None:
    """Default ``TF_CPP_MIN_LOG_LEVEL`` to 2 unless set; must run before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL_DEFAULT)
