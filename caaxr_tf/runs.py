"""A run folder written by ``caaxr_tf.train``, opened for evaluation, export, prediction and CV.

The folder's files are named in `caaxr_tf.run_files` (re-exported here).
"""

from __future__ import annotations

from caaxr_tf.run_files import (  # noqa: F401  (re-exported)
    BACKUP_DIR,
    BEST_MODEL,
    CONFIG_FILE,
    EVAL_DIR,
    FINAL_MODEL,
    HISTORY_FILE,
    LOG_DIR,
    load_run_config,
    load_run_model,
)
