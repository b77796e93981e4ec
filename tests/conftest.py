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
# CI sets this (.ci/run): there a missing real-data collection fails the tests that need it
# instead of skipping them quietly.
REQUIRE_SHARED_DATA = "CAAXR_REQUIRE_SHARED_DATA"


def pytest_report_header(config) -> str:
    """Which kernel set this run uses: `make test` runs the numerics tests once with oneDNN off."""
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    return f"caaxr-tf: TF_ENABLE_ONEDNN_OPTS={setting} (tolerances: tests/tolerances.py)"


def shared_data_required() -> bool:
    return os.environ.get(REQUIRE_SHARED_DATA, "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """The tiny synthetic dataset in the real layouts, generated once per test session."""
    from caaxr_tf.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_tiny")
    generate(root, scale="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_qata_root(tmp_path_factory) -> Path:
    """The tiny synthetic QaTa-COV19 tree (caaxr_tf.data.synthetic_qata), generated once per session."""
    from caaxr_tf.data.synthetic_qata import generate

    root = tmp_path_factory.mktemp("synthetic_qata_tiny")
    generate(root, scale="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_ct_root(tmp_path_factory) -> Path:
    """The tiny synthetic COVID-CTset (4 patients, 6 series, 99 slices, 4 bad files), once per session."""
    from caaxr_tf.data.synthetic_ct import generate

    root = tmp_path_factory.mktemp("synthetic_ct_tiny")
    generate(root, scale="tiny", seed=0)
    return root


def locate_shared_data(root: Path) -> Path:
    """``root`` when it holds the collection; else skip, or fail where CI requires the data."""
    if not (root / "metadata.csv").exists():
        message = f"real covid-chestxray collection not found at {root}"
        if shared_data_required():
            pytest.fail(f"{message} ({REQUIRE_SHARED_DATA} is set)", pytrace=False)
        pytest.skip(message)
    # resolved: the readers report resolved paths, and the data folder may be a symbolic link
    return root.resolve()


@pytest.fixture(scope="session")
def covid_chestxray_root() -> Path:
    return locate_shared_data(SHARED_COVID_CXR)


@pytest.fixture
def offline_keras_cache(tmp_path, monkeypatch):
    """An empty Keras cache in tmp_path and a network that refuses every download."""
    import urllib.error

    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras_home"))
    monkeypatch.setattr(file_utils, "urlretrieve", refuse)
    return tmp_path / "keras_home" / "models"
