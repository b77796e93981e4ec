"""Training: the typed run configuration, the generic Trainer and its callbacks.

    from caaxr_tf.training import Trainer, resolve_run_config
    config = resolve_run_config("TFRECORDS", "seg", "unet", fold=1, flags={"epochs": 2})
    Trainer(config, "runs/seg-unet-f1").fit()
"""

from caaxr_tf.training.callbacks import NonFiniteLossError, TrainingCallback
from caaxr_tf.training.config import (
    OptimizerConfig,
    RunConfig,
    config_from_mapping,
    read_run_config,
    resolve_run_config,
)
from caaxr_tf.training.distribute import is_chief, make_strategy
from caaxr_tf.training.trainer import Trainer, TrainResult

__all__ = [
    "NonFiniteLossError",
    "OptimizerConfig",
    "RunConfig",
    "TrainResult",
    "Trainer",
    "TrainingCallback",
    "config_from_mapping",
    "is_chief",
    "make_strategy",
    "read_run_config",
    "resolve_run_config",
]
