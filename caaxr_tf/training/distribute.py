"""tf.distribute strategies: one device, MirroredStrategy, MultiWorkerMirroredStrategy."""

from __future__ import annotations

import json
import os


def cluster_size() -> int:
    """Workers named by TF_CONFIG (chief included); 0 without a cluster."""
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


_MIRRORED: dict[tuple[str, ...], object] = {}


def make_strategy(name: str):
    """``auto``: MultiWorkerMirroredStrategy when TF_CONFIG names several workers,
    MirroredStrategy with several GPUs, else one device.

    One MirroredStrategy per device set and process: a second one would number its collective
    all-reduces from the same keys as the first, and TensorFlow then matches tensors of
    different trainings ("Shape mismatch in the collective instance")."""
    import tensorflow as tf

    if name == "auto":
        if cluster_size() > 1:
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = tuple(d.name for d in gpus) or tuple(d.name for d in tf.config.list_logical_devices("CPU"))
        if devices not in _MIRRORED:
            _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))
        return _MIRRORED[devices]
    device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)


def is_chief(strategy) -> bool:
    """The worker that writes the run folder (the only one without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def num_workers(strategy) -> int:
    """Processes taking part in training (1 unless multi-worker)."""
    import tensorflow as tf

    return max(1, cluster_size()) if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else 1
