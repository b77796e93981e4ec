"""Shared fixtures. TensorFlow gets two logical CPU devices so tf.distribute tests can run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
if _cpus and tf.config.get_logical_device_configuration(_cpus[0]) is None:
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:  # already initialised by an earlier import
        pass

SHARED_COVID_CXR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid-chestxray"


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """The tiny synthetic dataset in the real layouts, generated once per test session."""
    from caaxr_tf.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_tiny")
    generate(root, scale="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def covid_chestxray_root() -> Path:
    if not (SHARED_COVID_CXR / "metadata.csv").exists():
        pytest.skip(f"real covid-chestxray collection not found at {SHARED_COVID_CXR}")
    return SHARED_COVID_CXR
