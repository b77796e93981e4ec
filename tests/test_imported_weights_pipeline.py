"""Issue 24 end to end, without torch: an imported torchxrayvision-layout DenseNet-121 (random
weights, written in PyTorch names and layouts by `export_state_dict`) goes through
``caaxr import-weights`` -> ``caaxr train --weights`` (frozen backbone, xrv preprocessing inside
the model) -> severity approach (a) features and Grad-CAM -> ``caaxr export`` (model package
+ preset) -> ``caaxr predict`` in a fresh process on the export folder alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from caaxr_tf.weights.state_dict import write_safetensors

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")]
SIZE = 64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def xrv_checkpoint(tmp_path_factory) -> tuple[Path, keras.Model]:
    """A torchxrayvision-layout DenseNet-121 state dict (one input channel, 18 outputs, op_threshs)."""
    from caaxr_tf.weights.convert import export_state_dict, set_torch_bn_epsilon

    keras.utils.set_random_seed(1)
    net = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    rng = np.random.default_rng(1)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([1 + 0.1 * rng.standard_normal(c), 0.1 * rng.standard_normal(c),
                               0.1 * rng.standard_normal(c), 1 + rng.random(c)])
    state = export_state_dict(net, "densenet")
    stem = state["features.conv0.weight"]
    state["features.conv0.weight"] = stem.sum(axis=1, keepdims=True)  # one grey input channel
    # the import spreads it as kernel / 3 over the RGB channels: the channel mean of `net`'s stem
    state["classifier.weight"] = (0.05 * rng.standard_normal((18, 1024))).astype(np.float32)
    state["classifier.bias"] = np.zeros(18, np.float32)
    state["op_threshs"] = np.linspace(0.05, 0.6, 18).astype(np.float32)
    path = tmp_path_factory.mktemp("xrv") / "xrv-random.safetensors"
    write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in state.items()})
    set_torch_bn_epsilon(net)
    return path, net


@pytest.fixture(scope="module")
def imported(xrv_checkpoint, tmp_path_factory) -> Path:
    from caaxr_tf.cli import main as caaxr

    out = tmp_path_factory.mktemp("imported") / "xrv.weights.h5"
    assert caaxr(["import-weights", "--from", "torchxrayvision", str(xrv_checkpoint[0]), "--model", "densenet121",
                  "--out", str(out), "--input-size", str(SIZE)]) == 0
    return out


@pytest.fixture(scope="module")
def run(imported, tiny_data_root, tmp_path_factory) -> Path:
    from caaxr_tf.cli import main as caaxr
    from caaxr_tf.data.tfrecords import build_tfrecords

    records = tmp_path_factory.mktemp("records")
    build_tfrecords(tiny_data_root, records, protocols="2class", workers=1, progress=False)
    run_dir = tmp_path_factory.mktemp("runs") / "xrv"
    assert caaxr(["train", "--protocol", "2class", "--model", "densenet121", "--tfrecords", str(records),
                  "--out", str(run_dir), "--epochs", "1", "--steps-per-epoch", "2", "--validation-steps", "1",
                  "--batch-size", "4", "--weights", str(imported), "--set", f"image_size={SIZE}",
                  "--quiet"]) == 0
    return run_dir


def test_import_writes_the_contract(imported, xrv_checkpoint):
    from caaxr_tf.weights import load_imported

    contract = json.loads(imported.with_name("xrv.import.json").read_text())
    assert contract["source"] == "torchxrayvision" and contract["backbone"] == "densenet121"
    assert contract["preprocessing"]["value_range"] == [-1024.0, 1024.0]
    assert len(contract["head"]["thresholds"]) == 18 and contract["checkpoint_sha256"]
    backbone = load_imported(imported).backbone
    stem = backbone.get_layer("conv1_conv").get_weights()[0]
    expected = xrv_checkpoint[1].get_layer("conv1_conv").get_weights()[0].mean(axis=2, keepdims=True)
    np.testing.assert_allclose(stem, np.repeat(expected, 3, axis=2), atol=1e-6)
    for name in ("conv5_block16_2_conv", "pool3_bn", "bn"):
        for got, want in zip(backbone.get_layer(name).get_weights(), xrv_checkpoint[1].get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)


def test_train_uses_imported_weights_frozen_with_their_preprocessing(run, imported):
    from caaxr_tf.runs import load_run_model
    from caaxr_tf.weights import load_imported
    from caaxr_tf.weights.layers import PixelNormalization

    model = load_run_model(run, "best")
    pre = model.get_layer("preprocess")
    assert isinstance(pre, PixelNormalization) and pre.mean == [127.5]
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    assert not backbone.trainable
    assert all(layer.epsilon == 1e-5 for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    reference = load_imported(imported).backbone
    for name in ("conv1_conv", "conv4_block3_1_bn", "bn"):  # frozen: unchanged by training
        for got, want in zip(backbone.get_layer(name).get_weights(), reference.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    # the imported network's own features equal the trained classifier's backbone features
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 1)).astype("float32")
    source = load_imported(imported).build_source_model().predict(images, verbose=0)["features"]
    pooled = keras.Model(model.inputs, model.get_layer("avg_pool").output).predict(images, verbose=0)
    np.testing.assert_allclose(pooled, source, atol=1e-4)


def test_severity_features_and_grad_cam(run):
    from caaxr_tf.explain.gradcam import grad_cam
    from caaxr_tf.runs import load_run_model
    from caaxr_tf.severity.features import classifier_features

    model = load_run_model(run, "best")
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 1)).astype("float32")
    features = classifier_features(model, images)
    assert features.shape == (3, 512) and np.isfinite(features).all()
    cam = grad_cam(model, images[:1])
    assert cam.cam.shape == (1, SIZE, SIZE) and np.isfinite(cam.cam).all()


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    from caaxr_tf.export import main as export_main

    saved = tmp_path_factory.mktemp("saved") / "saved_models" / "xrv"
    preset = saved.parent.parent / "preset"
    assert export_main(["--run", str(run), "--out", str(saved), "--preset", str(preset)]) == 0
    return saved / "1"


def test_model_package_contents(exported, imported):
    from caaxr_tf.model_package import read_package

    card = read_package(exported)
    assert card["input"]["shape"] == [SIZE, SIZE, 1] and card["input"]["value_range"] == [0, 255]
    assert card["preprocessing"]["name"] == "torchxrayvision"
    assert card["weights"]["imported"]["source"] == "torchxrayvision" and card["weights"]["backbone_frozen"]
    assert card["training"]["protocol"] == "2class" and len(card["class_names"]) == 2
    assert "Not a medical device" in card["intended_use"]
    markdown = (exported / "assets.extra/package/model_card.md").read_text()
    assert "## Weights provenance" in markdown and "torchxrayvision" in markdown


def test_package_round_trips_through_predict_in_a_fresh_process(exported, run, tmp_path):
    from caaxr_tf.data.images import encode_png

    alone = tmp_path / "elsewhere" / "1"
    shutil.copytree(exported, alone)
    (alone / "assets.extra" / "caaxr_export.json").unlink()  # the package alone describes it
    image = tmp_path / "cxr.png"
    image.write_bytes(encode_png(np.random.default_rng(0).integers(0, 256, (80, 70), dtype=np.uint8)))
    code = ("import sys; from caaxr_tf.predict import main; sys.exit(main(['--model', sys.argv[1], sys.argv[2]]))")
    done = subprocess.run([sys.executable, "-c", code, str(alone), str(image)], capture_output=True, text=True,
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["model"]["name"] == "xrv" and len(record["probabilities"]) == 2


def test_missing_or_inconsistent_package_file_is_named(exported, tmp_path):
    from caaxr_tf.model_package import ModelPackageError
    from caaxr_tf.predict import ServedModel

    broken = tmp_path / "broken" / "1"
    shutil.copytree(exported, broken)
    (broken / "assets.extra/package/model_card.md").unlink()
    with pytest.raises(ModelPackageError, match="model_card.md is missing"):
        ServedModel(broken)
    shutil.rmtree(broken.parent)
    shutil.copytree(exported, broken)
    card_path = broken / "assets.extra/package/model_card.json"
    card = json.loads(card_path.read_text())
    card["class_names"] = ["a", "b"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match=r"model_card.json: class_names .* disagrees"):
        ServedModel(broken)
    (broken / "variables" / "variables.index").write_bytes(b"tampered")
    card["class_names"] = json.loads((broken / "assets.extra/caaxr_export.json").read_text())["class_names"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match="variables.index has changed"):
        ServedModel(broken)


def test_preset_loads_with_one_call(exported, run):
    from caaxr_tf.models.preset import PresetError, load_preset, load_preset_metadata
    from caaxr_tf.runs import load_run_model

    preset = exported.parents[2] / "preset"
    model = load_preset(preset)
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 1)).astype("float32")
    np.testing.assert_allclose(model.predict(images, verbose=0),
                               load_run_model(run, "best").predict(images, verbose=0), atol=1e-6)
    assert load_preset_metadata(preset)["imported_weights"]["source"] == "torchxrayvision"
    (preset / "metadata.json").unlink()
    with pytest.raises(PresetError, match="metadata.json is missing"):
        load_preset(preset)
