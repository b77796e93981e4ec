"""Moved to `caaxr_tf.data.ct_selection` (the data layer builds CT records with it); re-exported
here for existing imports."""

from caaxr_tf.data.ct_selection import (  # noqa: F401
    DARK_BELOW,
    MIN_SLICES,
    REGION_COLS,
    REGION_PIXELS,
    REGION_ROWS,
    SLICE_SHAPE,
    THRESHOLD_DIVISOR,
    SliceSelection,
    count_dark_pixels,
    dark_pixel_counts,
    select_from_counts,
    select_slices,
)
