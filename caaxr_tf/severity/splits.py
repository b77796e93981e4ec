"""Moved to `caaxr_tf.data.grouped_splits` (the protocol builder draws the halves with it);
re-exported here for existing imports."""

from caaxr_tf.data.grouped_splits import (  # noqa: F401
    DEFAULT_NUM_SPLITS,
    HalfSplit,
    grouped_half_split,
    grouped_half_splits,
    ordered_groups,
    patient_key,
)
