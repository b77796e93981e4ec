"""Float tolerances of the suite, each with its reason (one place, so a reader sees why a bound is
what it is and a new test picks the right one).

A float32 value computed by two different kernels or graphs — eager against ``tf.function``, Keras
against a SavedModel whose graph Grappler fused, oneDNN on against off, one CPU's vector width against
another's — is the same number only to about 1e-4 relative: the order of a reduction's additions
changes with the kernel. On an Intel AMX machine a 2-image cross-entropy differed by 1.5e-5 relative
between a traced training step and an eager recomputation, so 1e-5 is not portable.
"""

# The same float32 value through two kernel sets or graphs (see above).
KERNEL_RTOL = 1e-4
# Its absolute counterpart for values in [0, 1] (probabilities, masks, normalised CAMs): their float32
# sums of O(1) terms move by ~1e-6 between kernels; 1e-5 leaves room and still sees a 2e-4 offset.
KERNEL_ATOL = 1e-5
# A float32 result against a float64 reference of the same formula on the same kernel (elementwise
# ops, metric states): a few float32 ulps of O(1) values.
FLOAT32_ATOL = 1e-6


def threshold_bounds(probabilities, threshold: float = 0.5, margin: float = KERNEL_ATOL):
    """Binary masks of ``probabilities >= threshold`` that another kernel could give: (fewest, most).

    A pixel within ``margin`` of the threshold may fall either side when the model runs through
    another graph; every other pixel is decided. Equal masks when no pixel is that close.
    """
    return probabilities >= threshold + margin, probabilities >= threshold - margin
