"""--precision (caaxr_tf.models.precision): bfloat16 inference end to end on tiny runs.

bfloat16 is forced on (``CAAXR_PRECISIONS``) so that the tests run on any CPU: TensorFlow
has bfloat16 CPU kernels everywhere, only the speed needs avx512_bf16/amx_bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from caaxr_tf.data.pipeline import read_summary
from caaxr_tf.tasks.datasets import make_dataset
from caaxr_tf.evaluate import evaluate_run
from caaxr_tf.evaluate import main as evaluate_main
from caaxr_tf.export import PREPROCESSED_SIGNATURE, SERVING_SIGNATURE, export_run
from caaxr_tf.export import main as export_main
from caaxr_tf.models import build_model
from caaxr_tf.models.precision import (
    BFLOAT16_TOLERANCE,
    OVERRIDE_VARIABLE,
    PrecisionError,
    check_precision,
    compute_dtypes,
    precision_tag,
    tolerance,
    with_precision,
)

# Metric parity of a tiny run evaluated in bfloat16 and float32 (docs/BENCHMARKS.md): the
# outputs differ by far less than BFLOAT16_TOLERANCE, a handful of pixels / ranks flip.
METRIC_PARITY = 0.02


@pytest.fixture
def bf16(monkeypatch):
    monkeypatch.setenv(OVERRIDE_VARIABLE, "float32,bfloat16")


@pytest.fixture(scope="module")
def tfrecords(tiny_data_root, tmp_path_factory) -> Path:
    from caaxr_tf.data.tfrecords import build_tfrecords

    out = tmp_path_factory.mktemp("precision_tfrecords")
    build_tfrecords(tiny_data_root, out, protocols=["seg", "3class"], workers=1, progress=False, log=lambda _: None)
    return out


def write_run(run_dir: Path, model: keras.Model, *, protocol: str, model_name: str, tfrecords: Path,
              model_kwargs: dict | None = None) -> Path:
    summary = read_summary(tfrecords / protocol)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "protocol": protocol, "task": summary["task"], "model": model_name, "model_kwargs": model_kwargs or {},
        "fold": 1, "tfrecords": str(tfrecords / protocol), "class_names": summary["classes"],
        "image_size": 224, "batch_size": 16, "epochs": 1, "weights": "none", "seed": 0,
        "mixed_precision": False, "jit": False,
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    model.save(run_dir / "best.keras")
    return run_dir


@pytest.fixture(scope="module")
def seg_run(tfrecords, tmp_path_factory) -> Path:
    """A UNet (BatchNorm, 8 base filters) whose head is centred to predict partial masks."""
    keras.utils.set_random_seed(3)
    model = build_model("unet", base_filters=8)
    head = model.get_layer("mask")
    features = keras.Model(model.inputs, head.input)
    images, _ = next(iter(make_dataset(tfrecords / "seg", "train", batch_size=4, training=False, cache=False)))
    kernel, _ = head.get_weights()
    kernel = kernel * 50.0
    logits = np.asarray(features.predict(images, verbose=0)) @ kernel[0, 0]
    head.set_weights([kernel, -np.median(logits, axis=(0, 1, 2))])
    return write_run(tmp_path_factory.mktemp("seg_run"), model, protocol="seg", model_name="unet",
                     tfrecords=tfrecords, model_kwargs={"base_filters": 8})


@pytest.fixture(scope="module")
def cls_run(tfrecords, tmp_path_factory) -> Path:
    from caaxr_tf.models import GrayscaleToRGB, ImageNetPreprocessing

    keras.utils.set_random_seed(5)
    layers = keras.layers
    inputs = keras.Input((224, 224, 1), name="image")
    x = ImageNetPreprocessing("torch")(GrayscaleToRGB()(inputs))
    x = layers.AveragePooling2D(4)(x)
    x = layers.Conv2D(8, 5, strides=2, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(32, activation="relu")(x)
    outputs = layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(stddev=2.0))(x)
    return write_run(tmp_path_factory.mktemp("cls_run"), keras.Model(inputs, outputs), protocol="3class",
                     model_name="mobilenetv2", tfrecords=tfrecords)


def test_refused_where_the_device_lacks_it(monkeypatch, seg_run, tmp_path, capsys):
    monkeypatch.setenv(OVERRIDE_VARIABLE, "float32")  # a CPU without avx512_bf16 / amx_bf16
    with pytest.raises(PrecisionError, match="needs a CPU with avx512_bf16 or amx_bf16"):
        check_precision("bfloat16")
    with pytest.raises(PrecisionError, match="float16 needs a GPU"):
        check_precision("float16")
    check_precision("float32")
    with pytest.raises(ValueError, match="unknown precision"):
        check_precision("int8")
    out = tmp_path / "saved_models" / "seg"
    with pytest.raises(PrecisionError):
        export_run(seg_run, out, precision="bfloat16")
    assert not out.exists(), "nothing is written before the refusal"
    assert export_main(["--run", str(seg_run), "--out", str(out), "--precision", "bfloat16"]) == 2
    assert evaluate_main(["--run", str(seg_run), "--precision", "float16", "--no-plots"]) == 2
    assert "needs a" in capsys.readouterr().err
    assert not (seg_run / "eval" / "metrics_float16.json").exists()


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="float16 runs on GPUs")
def test_float16_refused_on_cpu_without_override(monkeypatch):
    monkeypatch.delenv(OVERRIDE_VARIABLE, raising=False)
    with pytest.raises(PrecisionError, match="float16 needs a GPU"):
        check_precision("float16")


def test_with_precision_copies_weights_and_keeps_float32_io(bf16, seg_run):
    from caaxr_tf.runs import load_run_model

    model = load_run_model(seg_run)
    assert with_precision(model, "float32") is model
    copy = with_precision(model, "bfloat16")
    dtypes = compute_dtypes(copy)
    assert dtypes["bfloat16"] > 10 and dtypes.get("float32", 0) >= 1  # the output layer stays float32
    assert copy.get_layer("mask").compute_dtype == "float32"
    for a, b in zip(model.get_weights(), copy.get_weights()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 1)).astype(np.float32)
    expected, got = np.asarray(model(images)), copy(images)
    assert got.dtype == tf.float32
    difference = np.abs(np.asarray(got) - expected)
    assert 0 < difference.max() <= BFLOAT16_TOLERANCE, "computed in bfloat16: close, not bit-equal"
    assert precision_tag("bfloat16") == "_bfloat16" and precision_tag("float32") == ""
    assert tolerance("bfloat16") == 2.0 ** -4


def test_export_in_bfloat16_is_served_and_checked(bf16, seg_run, tmp_path):
    from caaxr_tf.predict import ServedModel
    from caaxr_tf.runs import load_run_model

    base = tmp_path / "saved_models" / "seg"
    version = export_run(seg_run, base / "float32", precision="float32")
    bf16_version = export_run(seg_run, base / "bfloat16", precision="bfloat16")  # verified within 2^-4
    metadata = json.loads((bf16_version / "assets.extra" / "caaxr_export.json").read_text())
    assert metadata["precision"] == "bfloat16"
    loaded = tf.saved_model.load(str(bf16_version))
    signature = loaded.signatures[PREPROCESSED_SIGNATURE]
    assert signature.structured_input_signature[1]["images"].dtype == tf.float32
    assert signature.structured_outputs["mask"].dtype == tf.float32
    images = np.random.default_rng(1).uniform(0, 255, (3, 224, 224, 1)).astype(np.float32)
    served = signature(images=tf.constant(images))["mask"].numpy()
    reference = np.asarray(load_run_model(seg_run)(images, training=False))
    float32_served = tf.saved_model.load(str(version)).signatures[PREPROCESSED_SIGNATURE](
        images=tf.constant(images))["mask"].numpy()
    assert np.abs(float32_served - reference).max() <= 1e-4
    difference = np.abs(served - reference).max()
    assert 0 < difference <= BFLOAT16_TOLERANCE, difference
    # serving_default too, through predict's loader
    model = ServedModel(bf16_version)
    assert model.loaded.signatures[SERVING_SIGNATURE].structured_outputs["mask"].dtype == tf.float32


def test_export_check_uses_the_bfloat16_tolerance(bf16, seg_run, tmp_path, monkeypatch):
    import caaxr_tf.models.precision as precision

    monkeypatch.setitem(precision.TOLERANCES, "bfloat16", 1e-9)  # bf16 cannot meet this
    with pytest.raises(RuntimeError, match="tolerance 1e-09"):
        export_run(seg_run, tmp_path / "saved_models" / "seg", precision="bfloat16")


def test_evaluation_parity(bf16, seg_run, cls_run):
    results = {}
    for run in (seg_run, cls_run):
        for precision in ("float32", "bfloat16"):
            results[run.name, precision] = evaluate_run(run, plots=False, log=None, precision=precision)
        assert (run / "eval" / "metrics.json").exists() and (run / "eval" / "metrics_bfloat16.json").exists()
    seg32, seg16 = results[seg_run.name, "float32"], results[seg_run.name, "bfloat16"]
    assert seg16["inference_precision"] == "bfloat16" and seg32["inference_precision"] == "float32"
    assert abs(seg16["dice"] - seg32["dice"]) <= METRIC_PARITY
    assert abs(seg16["iou"] - seg32["iou"]) <= METRIC_PARITY
    cls32, cls16 = results[cls_run.name, "float32"], results[cls_run.name, "bfloat16"]
    assert abs(cls16["auc_macro"] - cls32["auc_macro"]) <= METRIC_PARITY
    assert abs(cls16["accuracy"] - cls32["accuracy"]) <= METRIC_PARITY * 3  # 45 images: one flip is 0.022
    print(json.dumps({"dice": [seg32["dice"], seg16["dice"]], "iou": [seg32["iou"], seg16["iou"]],
                      "auc_macro": [cls32["auc_macro"], cls16["auc_macro"]],
                      "accuracy": [cls32["accuracy"], cls16["accuracy"]]}))


def test_subclassed_models_are_refused(bf16):
    class Tiny(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, images):
            return self.dense(images)

    model = Tiny()
    model(np.zeros((1, 3), np.float32))
    with pytest.raises(PrecisionError, match="subclassed model"):
        with_precision(model, "bfloat16")
    assert with_precision(model, "float32") is model
