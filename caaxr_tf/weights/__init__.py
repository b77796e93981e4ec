"""Pretrained PyTorch chest X-ray / ImageNet weights imported into this project's Keras networks.

`import_weights` (``caaxr import-weights``) converts a torchxrayvision, torchvision or timm
state dict; the ``.weights.h5`` it writes works with ``--weights`` everywhere a backbone
weights file does, and its ``.import.json`` carries the source's preprocessing contract.
"""

from caaxr_tf.weights.convert import (  # noqa: F401
    ImportedWeights,
    WeightConversionError,
    import_weights,
    infer_architecture,
    load_imported,
    read_sidecar,
)
from caaxr_tf.weights.state_dict import StateDictError, load_state_dict  # noqa: F401
