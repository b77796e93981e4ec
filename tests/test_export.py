"""Export to TF Serving SavedModels and prediction from them (caaxr_tf.export, caaxr_tf.predict)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from tolerances import KERNEL_ATOL
import tensorflow as tf
import yaml

from caaxr_tf.data.dicom import read_dicom
from caaxr_tf.data.images import encode_png
from caaxr_tf.data.pipeline import parse_record, preprocess_image, read_summary, shard_files
from caaxr_tf.tasks.datasets import make_dataset
from caaxr_tf.export import (
    MODELS_CONFIG,
    PREPROCESSED_SIGNATURE,
    SERVING_SIGNATURE,
    decode_images,
    export_run,
    list_versions,
    main as export_main,
    write_models_config,
)
from caaxr_tf.models import build_model
from caaxr_tf.predict import ServedModel, predict_files
from caaxr_tf.predict import main as predict_main
from caaxr_tf.runs import load_run_model

pytestmark = [
    pytest.mark.numerics,  # numerics: rerun with oneDNN off by `make test` (tolerances.py)
    pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

TOLERANCE = KERNEL_ATOL  # served graph (Grappler-fused) against eager Keras, outputs in [0, 1]

# Runs in a fresh interpreter: only TensorFlow, no caaxr_tf, so the export must be standalone.
FRESH_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf


def array(tensor):
    value = tensor.numpy()
    return value.astype(bytes) if value.dtype == object else value


job = json.load(open(sys.argv[1]))
results = {}
pixels = np.load(job["pixels"])
for name, export in job["exports"].items():
    loaded = tf.saved_model.load(export)
    out = loaded.signatures["predict_preprocessed"](images=tf.constant(pixels))
    results.update({f"{name}/preprocessed/{k}": array(v) for k, v in out.items()})
    for request, spec in job["requests"].items():
        images = tf.constant([open(path, "rb").read() for path in spec["files"]])
        if spec["defaults"]:
            out = loaded.serving_default(images)
        else:
            out = loaded.signatures["serving_default"](
                images=images,
                invert=tf.constant(spec["invert"], tf.bool),
                bit_depth=tf.constant(spec["bit_depth"], tf.int32),
            )
        results.update({f"{name}/{request}/{k}": array(v) for k, v in out.items()})
results["caaxr_tf_imported"] = np.array(any(m.startswith("caaxr_tf") for m in sys.modules))
np.savez(job["out"], **results)
"""


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _make_run(run_dir: Path, network: keras.Model, **config) -> Path:
    run_dir.mkdir(parents=True)
    network.save(run_dir / "best.keras")
    base = {
        "fold": 1, "image_size": 224, "batch_size": 4, "epochs": 1, "steps_per_epoch": None,
        "validation_steps": None, "optimizer": {"name": "adam", "learning_rate": 1e-3},
        "weights": "none", "strategy": "default", "mixed_precision": False, "jit": False, "seed": 0,
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**base, **config}), encoding="utf-8")
    return run_dir


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _gradient(height: int, width: int, high: int, seed: int = 0) -> np.ndarray:
    """A lung-ish test image: a smooth gradient with noise, up to ``high``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 0.6 * x / width + 0.3 * np.sin(y / height * np.pi) + 0.1 * rng.uniform(size=(height, width))
    return np.rint(base / base.max() * high)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tfrecords(tiny_data_root, tmp_path_factory) -> Path:
    from caaxr_tf.data.tfrecords import build_tfrecords

    out = tmp_path_factory.mktemp("export_tfrecords")
    build_tfrecords(tiny_data_root, out, protocols="2class", workers=1, progress=False)
    return out / "2class"


@pytest.fixture(scope="module")
def runs(tfrecords, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_runs")
    keras.utils.set_random_seed(0)
    classes = read_summary(tfrecords)["classes"]
    unet = _make_run(
        root / "unet", build_model("unet", base_filters=8), protocol="seg", task="segmentation",
        model="unet", model_kwargs={"base_filters": 8}, tfrecords="/unused/seg", class_names=["lesion"],
        loss="binary_crossentropy", monitor="val_dice", monitor_mode="max",
    )
    resnet = _make_run(
        root / "resnet18", build_model("resnet18", num_classes=len(classes)), protocol="2class",
        task="classification", model="resnet18", model_kwargs={}, tfrecords=str(tfrecords),
        class_names=classes, loss="categorical_crossentropy", monitor="val_auc", monitor_mode="max",
    )
    return {"unet": unet, "resnet18": resnet}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    """The UNet through the command line's ``main``, the classifier through ``export_run``."""
    saved = tmp_path_factory.mktemp("export_cli") / "saved_models"
    assert export_main(["--run", str(runs["unet"]), "--out", str(saved / "unet")]) == 0
    resnet = export_run(runs["resnet18"], saved / "resnet18", verify=False)  # compared in a fresh process below
    return {"unet": saved / "unet" / "1", "resnet18": resnet}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-layer segmentation model: cheap to export many times."""
    inputs = keras.Input((224, 224, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(keras.layers.Rescaling(1 / 255)(inputs))
    return _make_run(
        tmp_path_factory.mktemp("export_tiny") / "run", keras.Model(inputs, outputs), protocol="seg",
        task="segmentation", model="unet", model_kwargs={}, tfrecords="/unused/seg", class_names=["lesion"],
        loss="binary_crossentropy", monitor="val_dice", monitor_mode="max",
    )


@pytest.fixture(scope="module")
def val_records(tfrecords) -> list[dict]:
    """One validation record of every (bit depth, invert) kind."""
    records: dict[tuple[int, bool], dict] = {}
    for record in tf.data.TFRecordDataset(shard_files(tfrecords, "val", fold=1)).map(parse_record):
        kind = (int(record["image/bit_depth"].numpy()), bool(record["image/invert"].numpy()))
        records.setdefault(
            kind,
            {
                "id": record["image/id"].numpy().decode(),
                "encoded": record["image/encoded"].numpy(),
                "invert": kind[1],
                "bit_depth": kind[0],
            },
        )
    return list(records.values())


@pytest.fixture(scope="module")
def pipeline_images(tfrecords) -> dict[str, np.ndarray]:
    dataset = make_dataset(
        tfrecords, "val", fold=1, batch_size=64, augment=False, training=False, with_ids=True, cache=False
    )
    images, _, ids = next(iter(dataset))
    return {i.decode(): image for i, image in zip(ids.numpy(), images.numpy())}


@pytest.fixture(scope="module")
def own_files(tmp_path_factory) -> dict[str, Path]:
    """A 16-bit PNG holding 12 bits, an 8-bit PNG and a JPEG, not from the TFRecords."""
    root = tmp_path_factory.mktemp("export_files")
    twelve = _gradient(300, 260, 4095).astype(np.uint16)
    eight = _gradient(240, 280, 255, seed=1).astype(np.uint8)
    files = {"png16": root / "twelve_bits.png", "png8": root / "eight.png", "jpeg": root / "photo.jpg"}
    cv2.imwrite(str(files["png16"]), twelve)
    cv2.imwrite(str(files["png8"]), eight)
    cv2.imwrite(str(files["jpeg"]), eight[::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return files


@pytest.fixture(scope="module")
def fresh(exports, val_records, own_files, tmp_path_factory) -> dict[str, np.ndarray]:
    """Outputs of the exports loaded with ``tf.saved_model.load`` in a fresh interpreter."""
    root = tmp_path_factory.mktemp("export_fresh")
    pixels = np.random.default_rng(3).uniform(0, 255, (2, 224, 224, 1)).astype(np.float32)
    np.save(root / "pixels.npy", pixels)
    record_files = []
    for number, record in enumerate(val_records):
        record_files.append(str(root / f"record{number}.png"))
        Path(record_files[-1]).write_bytes(record["encoded"])
    files = [str(own_files[key]) for key in ("png16", "png8", "jpeg")]
    job = {
        "pixels": str(root / "pixels.npy"),
        "exports": {name: str(path) for name, path in exports.items()},
        "requests": {
            "records": {
                "files": record_files,
                "invert": [r["invert"] for r in val_records],
                "bit_depth": [r["bit_depth"] for r in val_records],
                "defaults": False,
            },
            "files": {"files": files, "defaults": True},
            "files_inverted_12bit": {"files": files, "invert": [True] * 3, "bit_depth": [12, 0, 0], "defaults": False},
        },
        "out": str(root / "out.npz"),
    }
    (root / "job.json").write_text(json.dumps(job), encoding="utf-8")
    (root / "fresh.py").write_text(FRESH_PROCESS, encoding="utf-8")
    done = _run([str(root / "fresh.py"), str(root / "job.json")], root)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(root / "out.npz") as data:
        results = {key: data[key] for key in data.files}
    results["pixels"] = pixels
    return results


@pytest.fixture(scope="module")
def keras_models(runs) -> dict[str, keras.Model]:
    return {name: load_run_model(path) for name, path in runs.items()}


def _output_key(name: str) -> str:
    return "mask" if name == "unet" else "probabilities"


def _preprocess(path: Path, bit_depth: int, invert: bool) -> np.ndarray:
    pixels = preprocess_image(tf.constant(path.read_bytes()), bit_depth, invert)
    return tf.cast(pixels, tf.float32).numpy()


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", ["unet", "resnet18"])
def test_fresh_process_export_equals_keras_model(name, fresh, keras_models):
    assert not fresh["caaxr_tf_imported"]
    expected = keras_models[name](fresh["pixels"], training=False).numpy()
    got = fresh[f"{name}/preprocessed/{_output_key(name)}"]
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= TOLERANCE


@pytest.mark.parametrize("name", ["unet", "resnet18"])
def test_serving_default_equals_tf_data_pipeline(name, fresh, keras_models, val_records, pipeline_images):
    kinds = {(r["bit_depth"], r["invert"]) for r in val_records}
    assert (12, True) in kinds and (16, False) in kinds and (8, False) in kinds, kinds
    batch = np.stack([pipeline_images[r["id"]] for r in val_records])
    expected = keras_models[name](batch, training=False).numpy()
    got = fresh[f"{name}/records/{_output_key(name)}"]
    assert np.max(np.abs(got - expected)) <= TOLERANCE
    # The comparison can tell: the same images without inversion give other outputs.
    flipped = [not r["invert"] for r in val_records]
    encoded = tf.constant([r["encoded"] for r in val_records])
    other = decode_images(encoded, tf.constant(flipped), tf.constant([r["bit_depth"] for r in val_records]))
    changed = keras_models[name](other.numpy(), training=False).numpy()
    assert np.max(np.abs(changed - expected)) > 20 * TOLERANCE


def test_in_graph_preprocessing_gives_the_pipeline_pixels(val_records, pipeline_images):
    pixels = decode_images(
        tf.constant([r["encoded"] for r in val_records]),
        tf.constant([r["invert"] for r in val_records]),
        tf.constant([r["bit_depth"] for r in val_records], tf.int32),
    ).numpy()
    expected = np.stack([pipeline_images[r["id"]] for r in val_records])
    np.testing.assert_array_equal(pixels, expected)
    # A 12-bit image read as full 16-bit range would come out nearly black.
    twelve = [i for i, r in enumerate(val_records) if r["bit_depth"] == 12 and not r["invert"]]
    encoded = tf.constant([val_records[i]["encoded"] for i in twelve])
    as_sixteen = decode_images(encoded, tf.zeros([len(twelve)], tf.bool), tf.zeros([len(twelve)], tf.int32)).numpy()
    assert as_sixteen.mean() < expected[twelve].mean() / 4


@pytest.mark.parametrize("name", ["unet", "resnet18"])
def test_own_png16_png8_jpeg_with_defaults_and_inversion(name, fresh, keras_models, own_files):
    model = keras_models[name]
    files = [own_files[k] for k in ("png16", "png8", "jpeg")]
    default = np.stack([_preprocess(f, d, False) for f, d in zip(files, (16, 8, 8))])
    inverted = np.stack([_preprocess(f, d, True) for f, d in zip(files, (12, 8, 8))])
    key = _output_key(name)
    for request, batch in (("files", default), ("files_inverted_12bit", inverted)):
        expected = model(batch, training=False).numpy()
        assert np.max(np.abs(fresh[f"{name}/{request}/{key}"] - expected)) <= TOLERANCE, request
    # 12 significant bits read as 16 give a dark image; inverted with the right range, v -> 255 - v.
    as_twelve = _preprocess(files[0], 12, False)
    assert default[0].max() < 20 and np.mean(np.abs(inverted[0] + as_twelve - 255.0)) < 0.5


def test_classifier_outputs_name_the_classes(fresh, runs):
    classes = yaml.safe_load((runs["resnet18"] / "config.yaml").read_text())["class_names"]
    probabilities = fresh["resnet18/records/probabilities"]
    names = fresh["resnet18/records/class_names"]
    assert names.shape == (len(probabilities), len(classes))
    assert [n.decode() for n in names[0]] == classes
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)  # a float32 softmax sums to 1 within ulps
    predicted = [p.decode() for p in fresh["resnet18/records/predicted_class"]]
    assert predicted == [classes[i] for i in probabilities.argmax(axis=1)]
    assert fresh["unet/records/mask"].shape == (len(probabilities), 224, 224, 1)


# --------------------------------------------------------------------------- layout


def test_signature_defs_and_metadata(exports):
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((exports["resnet18"] / "saved_model.pb").read_bytes())
    signatures = saved.meta_graphs[0].signature_def
    serving = signatures[SERVING_SIGNATURE]
    dtypes = {name: tf.dtypes.as_dtype(info.dtype) for name, info in serving.inputs.items()}
    assert dtypes == {"images": tf.string, "invert": tf.bool, "bit_depth": tf.int32}
    assert set(serving.defaults) == {"invert", "bit_depth"}  # TF Serving fills these in
    assert set(serving.outputs) == {"probabilities", "predicted_class", "class_names"}
    preprocessed = signatures[PREPROCESSED_SIGNATURE].inputs["images"]
    assert [d.size for d in preprocessed.tensor_shape.dim] == [-1, 224, 224, 1]
    assert tf.dtypes.as_dtype(preprocessed.dtype) == tf.float32
    meta = json.loads((exports["resnet18"] / "assets.extra" / "caaxr_export.json").read_text())
    assert meta["task"] == "classification" and meta["model"] == "resnet18" and meta["version"] == 1


def _parse_models_config(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    try:
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError:
        assert text.count("{") == text.count("}") and "model_config_list {" in text
        return re.findall(r'name: "([^"]+)"\s+base_path: "([^"]+)"', text)
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    assert all(c.model_platform == "tensorflow" for c in config.model_config_list.config)
    return [(c.name, c.base_path) for c in config.model_config_list.config]


def test_models_config_lists_every_export(exports):
    root = exports["unet"].parents[1]
    entries = _parse_models_config(root / MODELS_CONFIG)
    assert entries == [
        ("resnet18", str((root / "resnet18").resolve())),
        ("unet", str((root / "unet").resolve())),
    ]
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


def test_models_config_serving_root_is_kept_and_must_be_absolute(exports, tmp_path):
    root = tmp_path / "saved_models"
    (root / "b" / "3").mkdir(parents=True)
    (root / "a" / "1").mkdir(parents=True)
    (root / "not_exported").mkdir()
    write_models_config(root, serving_root="/models/")
    assert _parse_models_config(root / MODELS_CONFIG) == [("a", "/models/a"), ("b", "/models/b")]
    (root / "c" / "1").mkdir(parents=True)
    write_models_config(root)  # keeps the prefix the file already uses
    assert _parse_models_config(root / MODELS_CONFIG)[-1] == ("c", "/models/c")
    with pytest.raises(ValueError, match="absolute"):
        write_models_config(root, serving_root="models")
    assert [p.name for p in root.iterdir() if p.is_file()] == [MODELS_CONFIG]


def test_version_numbering_and_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "saved_models" / "seg-tiny"
    assert export_run(tiny_run, out).name == "1"
    assert export_run(tiny_run, out, version=7).name == "7"
    assert export_run(tiny_run, out).name == "8"  # the next after the highest
    assert list_versions(out) == [1, 7, 8]
    seven = out / "7"
    stamp = (seven / "saved_model.pb").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_run(tiny_run, out, version=7)
    assert export_main(["--run", str(tiny_run), "--out", str(out), "--version", "7"]) == 2
    assert "7 already exists; pass --overwrite" in capsys.readouterr().err
    assert (seven / "saved_model.pb").stat().st_mtime_ns == stamp
    assert export_main(["--run", str(tiny_run), "--out", str(out), "--version", "7", "--overwrite"]) == 0
    assert f"exported {tiny_run} to {seven}" in capsys.readouterr().out
    assert (seven / "saved_model.pb").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in out.iterdir()) == ["1", "7", "8"]  # no temporary left behind
    assert _parse_models_config(out.parent / MODELS_CONFIG) == [("seg-tiny", str(out.resolve()))]
    with pytest.raises(ValueError, match="model name"):
        export_run(tiny_run, tmp_path / "saved_models" / "bad name")


# --------------------------------------------------------------------------- bad requests


@pytest.fixture(scope="module")
def loaded_unet(exports):
    return tf.saved_model.load(str(exports["unet"]))


def test_bad_requests_give_clear_errors(loaded_unet, own_files):
    serve = loaded_unet.signatures[SERVING_SIGNATURE]
    png = own_files["png16"].read_bytes()
    jpeg = own_files["jpeg"].read_bytes()

    def call(images, invert=None, bit_depth=None):
        count = len(images)
        return serve(
            images=tf.constant(images, tf.string),
            invert=tf.constant([False] * count if invert is None else invert, tf.bool),
            bit_depth=tf.constant([0] * count if bit_depth is None else bit_depth, tf.int32),
        )

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not an image at index:\] \[1\]"):
        call([png, b"this is not an image", jpeg])
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        call([])
    with pytest.raises(tf.errors.InvalidArgumentError, match="`invert` must be empty or hold one value per image"):
        call([png, jpeg], invert=[True])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`bit_depth` must be.*\[1\] \[given:\] \[12\]"):
        call([png, jpeg], bit_depth=[12, 12])  # a JPEG holds 8 bits
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError), match="string"):
        serve(images=tf.constant([1, 2]), invert=tf.constant([False, False]), bit_depth=tf.constant([0, 0]))
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError), match="bool"):
        serve(images=tf.constant([png]), invert=tf.constant([1]), bit_depth=tf.constant([0]))
    preprocessed = loaded_unet.signatures[PREPROCESSED_SIGNATURE]
    with pytest.raises(tf.errors.InvalidArgumentError, match="0..255"):
        preprocessed(images=tf.fill([1, 224, 224, 1], 300.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        preprocessed(images=tf.zeros([0, 224, 224, 1]))
    # Wrong shapes are rejected by the graph itself (TF Serving does not check them), naming
    # the expected and the given shape, before any convolution runs.
    wrong_shapes = {(1, 128, 128, 1): "1 128 128 1", (2, 224, 224, 3): "2 224 224 3", (224, 224, 1): "224 224 1",
                    (1, 1, 224, 224, 1): "1 1 224 224 1"}
    for shape, given in wrong_shapes.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as raised:
            preprocessed(images=tf.zeros(shape))
        assert re.search(r"`images` must have shape \[N, 224, 224, 1\]; got shape\] \[" + given + r"\]",
                         str(raised.value)), str(raised.value)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`images` must be a 1-D batch \[N\] of encoded PNG or JPEG images; got shape\] \[2 1\]"):
        serve(images=tf.constant([[png], [jpeg]]), invert=tf.constant([False, False]), bit_depth=tf.constant([0, 0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`invert` must be a 1-D batch \[N\] of booleans; got shape\] \[2 1\]"):
        serve(images=tf.constant([png, jpeg]), invert=tf.constant([[False], [True]]), bit_depth=tf.constant([0, 0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`bit_depth` must be a 1-D batch \[N\] of integers; got shape\] \[\]"):
        serve(images=tf.constant([png]), invert=tf.constant([False]), bit_depth=tf.constant(0))
    assert call([png, jpeg])["mask"].shape == (2, 224, 224, 1)  # the good request still works


def test_predict_request_from_serving_api_matches_the_signature(exports, own_files, keras_models):
    predict_pb2 = pytest.importorskip(
        "tensorflow_serving.apis.predict_pb2", reason="tensorflow-serving-api is not installed (pip install .[serving])"
    )
    from tensorflow.core.protobuf import saved_model_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "resnet18"
    request.model_spec.signature_name = SERVING_SIGNATURE
    files = [own_files["png16"], own_files["jpeg"]]
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([f.read_bytes() for f in files]))
    request.inputs["invert"].CopyFrom(tf.make_tensor_proto([True, False]))
    request.inputs["bit_depth"].CopyFrom(tf.make_tensor_proto([12, 0]))
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # as the server receives it

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((exports["resnet18"] / "saved_model.pb").read_bytes())
    signature = saved.meta_graphs[0].signature_def[request.model_spec.signature_name]
    assert set(request.inputs) == set(signature.inputs)
    for name, tensor in request.inputs.items():
        assert tensor.dtype == signature.inputs[name].dtype, name
    # What the server would run: the request's tensors fed to the signature.
    loaded = tf.saved_model.load(str(exports["resnet18"]))
    feeds = {name: tf.constant(tf.make_ndarray(tensor)) for name, tensor in request.inputs.items()}
    got = loaded.signatures[SERVING_SIGNATURE](**feeds)["probabilities"].numpy()
    batch = np.stack([_preprocess(files[0], 12, True), _preprocess(files[1], 8, False)])
    expected = keras_models["resnet18"](batch, training=False).numpy()
    assert np.max(np.abs(got - expected)) <= TOLERANCE


# --------------------------------------------------------------------------- predict


def test_predict_cli_reports_bad_files_and_goes_on(exports, own_files, tmp_path, capsys):
    folder = tmp_path / "inputs"
    (folder / "nested").mkdir(parents=True)
    (folder / "a_twelve.png").write_bytes(own_files["png16"].read_bytes())
    jpeg = own_files["jpeg"].read_bytes()
    (folder / "b_photo.jpg").write_bytes(jpeg)
    (folder / "c_garbage.png").write_bytes(b"this is not an image")
    (folder / "d_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40) + b"IEND")  # passes the byte checks
    _write_dicom(folder / "nested" / "f_scan.dcm", _gradient(120, 100, 4095).astype(np.uint16), "MONOCHROME1")
    (folder / "notes.txt").write_text("not an input")
    assert predict_main(["--model", str(exports["unet"].parent), str(folder)]) == 1
    done = capsys.readouterr()
    records = [json.loads(line) for line in done.out.splitlines()]
    names = [Path(r["file"]).name for r in records]
    assert names == ["a_twelve.png", "b_photo.jpg", "c_garbage.png", "d_truncated.jpg", "e_corrupt.png", "f_scan.dcm"]
    failed = {Path(r["file"]).name: r["error"] for r in records if "error" in r}
    assert set(failed) == {"c_garbage.png", "d_truncated.jpg", "e_corrupt.png"}
    assert "not a PNG, JPEG or DICOM" in failed["c_garbage.png"]
    assert "truncated JPEG" in failed["d_truncated.jpg"]
    assert "PNG" in failed["e_corrupt.png"] and "node" not in failed["e_corrupt.png"]
    for name in failed:
        assert f"error: {folder / name}: " in done.err
    for record in records:
        if "error" not in record:
            assert 0.0 <= record["mask_area_fraction"] <= 1.0 and record["mask_threshold"] == 0.5
    assert records[-1]["input"] == {"format": "dicom", "invert": False, "bit_depth": 16}


def test_predict_files_classifier_records(exports, keras_models, own_files, runs):
    files = [own_files["png16"], own_files["jpeg"]]
    results = predict_files(exports["resnet18"], files, bit_depth=12)
    classes = yaml.safe_load((runs["resnet18"] / "config.yaml").read_text())["class_names"]
    batch = np.stack([_preprocess(files[0], 12, False), _preprocess(files[1], 8, False)])
    expected = keras_models["resnet18"](batch, training=False).numpy()
    for record, row in zip(results, expected):
        assert list(record["probabilities"]) == classes
        np.testing.assert_allclose(list(record["probabilities"].values()), row, atol=KERNEL_ATOL)  # served vs eager
        assert record["predicted_class"] == classes[int(row.argmax())]
    assert [r["input"]["bit_depth"] for r in results] == [12, 8]  # --bit-depth is for 16-bit PNGs


def test_predict_files_dicom_sidecar_and_overlays(exports, keras_models, tmp_path):
    pixels = _gradient(200, 180, 4095, seed=5).astype(np.uint16)
    mono1 = _write_dicom(tmp_path / "mono1.dcm", pixels, "MONOCHROME1")
    mono2 = _write_dicom(tmp_path / "mono2.dcm", pixels, "MONOCHROME2")
    bimcv = tmp_path / "bimcv" / "sub-S1_ses-E1_run-1_bp-chest_vp-ap_dx.png"
    bimcv.parent.mkdir()
    cv2.imwrite(str(bimcv), pixels)
    sidecar = {"00280101": {"vr": "US", "Value": [12]}, "20500020": {"vr": "CS", "Value": ["INVERSE"]}}
    bimcv.with_suffix(".json").write_text(json.dumps(sidecar))

    overlays = tmp_path / "overlays"
    results = predict_files(exports["unet"], [mono1, mono2, bimcv.parent], overlay_dir=overlays, batch_size=2)
    assert [Path(r["file"]).name for r in results] == ["mono1.dcm", "mono2.dcm", bimcv.name]
    assert [r["input"] for r in results] == [
        {"format": "dicom", "invert": False, "bit_depth": 16},
        {"format": "dicom", "invert": False, "bit_depth": 16},
        {"format": "png", "invert": True, "bit_depth": 12},
    ]
    # MONOCHROME1 is inverted by read_dicom before the model sees it.
    inverted = 65535 - read_dicom(mono2).pixels.astype(int)
    np.testing.assert_allclose(read_dicom(mono1).pixels.astype(int), inverted, atol=1)
    inputs = []
    for path in (mono1, mono2):
        encoded = encode_png(read_dicom(path).pixels)
        inputs.append(tf.cast(preprocess_image(tf.constant(encoded), 16, False), tf.float32).numpy())
    inputs.append(_preprocess(bimcv, 12, True))
    masks = keras_models["unet"](np.stack(inputs), training=False).numpy()
    expected = (masks >= 0.5).mean(axis=(1, 2, 3))
    assert abs(expected[0] - expected[1]) > 1e-3  # the inversion changes the answer
    got = np.array([r["mask_area_fraction"] for r in results])
    assert np.max(np.abs(got - expected)) <= 2 / 224**2
    written = [Path(r["overlay"]) for r in results]
    assert len(set(written)) == 3 and all(path.parent == overlays for path in written)
    for path, pixels, mask in zip(written, inputs, masks):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # BGR
        assert image.shape == (224, 224, 3)
        inside = mask[:, :, 0] >= 0.5
        np.testing.assert_array_equal(image[~inside], np.repeat(pixels[~inside], 3, axis=-1))  # grey outside
        if inside.any():
            assert np.all(image[inside][:, 2] >= image[inside][:, 1])  # tinted red inside


def test_served_model_resolves_the_latest_version(tiny_run, tmp_path):
    """Versions 2 and 10: the highest number is picked, not the last name in lexical order."""
    base = tmp_path / "saved_models" / "seg-tiny"
    assert export_run(tiny_run, base, version=10, verify=False).name == "10"
    assert export_run(tiny_run, base, version=2, verify=False).name == "2"
    (base / "notes").mkdir()  # not a version
    assert list_versions(base) == [2, 10] and sorted(p.name for p in base.iterdir())[-1] == "notes"
    model = ServedModel(base)
    assert model.path == base / "10" and model.task.name == "segmentation" and model.image_size == 224
    metadata = json.loads((model.path / "assets.extra" / "caaxr_export.json").read_text())
    assert metadata["version"] == 10
    assert ServedModel(base / "2").path == base / "2"  # a version folder is taken as given
    assert export_run(tiny_run, base, verify=False).name == "11"
    with pytest.raises(FileNotFoundError, match="no SavedModel"):
        ServedModel(tmp_path / "saved_models" / "missing")


@keras.saving.register_keras_serializable(package="caaxr_tf_tests")
class GraphOnlyOffset(keras.layers.Layer):
    """Adds ``offset`` only when traced into a graph: the Keras model (eager) and its export
    then differ by exactly ``offset``, as with a broken export."""

    def __init__(self, offset: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.offset = offset

    def call(self, inputs):
        return inputs if tf.executing_eagerly() else inputs + self.offset

    def get_config(self) -> dict:
        return {**super().get_config(), "offset": self.offset}


def _offset_run(run_dir: Path, offset: float) -> Path:
    keras.utils.set_random_seed(2)
    inputs = keras.Input((224, 224, 1))
    logits = keras.layers.Conv2D(1, 1, name="conv")(keras.layers.Rescaling(1 / 255)(inputs))
    return _make_run(
        run_dir, keras.Model(inputs, GraphOnlyOffset(offset, name="mask")(logits)), protocol="seg",
        task="segmentation", model="unet", model_kwargs={}, tfrecords="/unused/seg", class_names=["lesion"],
        loss="binary_crossentropy", monitor="val_dice", monitor_mode="max",
    )


def test_export_verification_fails_above_1e4_and_no_verify_skips_it(tmp_path, capsys):
    saved = tmp_path / "saved_models"
    within = _offset_run(tmp_path / "within", 5e-5)
    assert export_run(within, saved / "within").name == "1"  # 5e-5 <= 1e-4

    beyond = _offset_run(tmp_path / "beyond", 2e-4)
    assert export_main(["--run", str(beyond), "--out", str(saved / "beyond")]) == 2
    assert "differs from the Keras model by 0.0002" in capsys.readouterr().err
    assert list((saved / "beyond").iterdir()) == []  # no version, no temporary folder
    assert _parse_models_config(saved / MODELS_CONFIG) == [("within", str((saved / "within").resolve()))]

    assert export_main(["--run", str(beyond), "--out", str(saved / "beyond"), "--no-verify"]) == 0
    assert list_versions(saved / "beyond") == [1]
    # the check compares what it should: the export really is 2e-4 off
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 1)).astype(np.float32)
    served = tf.saved_model.load(str(saved / "beyond" / "1")).signatures[PREPROCESSED_SIGNATURE]
    difference = served(images=tf.constant(images))["mask"].numpy() - load_run_model(beyond)(images).numpy()
    np.testing.assert_allclose(difference, 2e-4, atol=KERNEL_ATOL)  # served graph vs eager Keras: 2e-4 plus kernel noise


def test_export_which_final(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    final = load_run_model(run)
    final.get_layer("mask").set_weights([w + 0.5 for w in final.get_layer("mask").get_weights()])
    final.save(run / "final.keras")
    saved = tmp_path / "saved_models" / "seg"
    assert export_main(["--run", str(run), "--out", str(saved), "--which", "final"]) == 0
    assert export_main(["--run", str(run), "--out", str(saved)]) == 0  # best, the default
    images = np.random.default_rng(1).uniform(0, 255, (2, 224, 224, 1)).astype(np.float32)
    outputs = {}
    for version, which in ((1, "final"), (2, "best")):
        metadata = json.loads((saved / str(version) / "assets.extra" / "caaxr_export.json").read_text())
        assert metadata["checkpoint"] == which
        served = tf.saved_model.load(str(saved / str(version))).signatures[PREPROCESSED_SIGNATURE]
        outputs[which] = served(images=tf.constant(images))["mask"].numpy()
    np.testing.assert_allclose(outputs["final"], final(images).numpy(), atol=TOLERANCE)
    np.testing.assert_allclose(outputs["best"], load_run_model(run, "best")(images).numpy(), atol=TOLERANCE)
    assert np.abs(outputs["final"] - outputs["best"]).max() > 0.01


def _detector(max_detections: int = 4) -> keras.Model:
    """A stand-in with Mask R-CNN's inference outputs: a dict with mask, boxes, scores, classes
    and num_detections."""
    ops = keras.ops
    inputs = keras.Input((224, 224, 1), name="image")
    scaled = keras.layers.Rescaling(1 / 255)(inputs)
    mask = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(scaled)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, strides=4)(scaled))
    boxes = keras.layers.Dense(4 * max_detections, activation="sigmoid")(pooled)
    boxes = keras.layers.Reshape((max_detections, 4))(boxes)
    scores = keras.layers.Dense(max_detections, activation="sigmoid", name="scores")(pooled)
    outputs = {
        "mask": mask,
        "boxes": boxes,
        "scores": scores,
        "classes": ops.cast(ops.greater(scores, 0.4), "int32"),
        "num_detections": ops.sum(ops.cast(ops.greater(scores, 0.5), "int32"), axis=1),
    }
    return keras.Model(inputs, outputs, name="detector")


def test_dict_outputs_are_all_exported_and_reported(tmp_path):
    keras.utils.set_random_seed(1)
    model = _detector()
    run = _make_run(
        tmp_path / "run", model, protocol="seg", task="segmentation", model="maskrcnn", model_kwargs={},
        tfrecords="/unused/seg", class_names=["lesion"], loss="model", monitor="val_loss", monitor_mode="min",
    )
    export = export_run(run, tmp_path / "saved_models" / "maskrcnn")
    served = ServedModel(export)
    assert served.outputs == {"mask", "boxes", "scores", "classes", "num_detections"}
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), _gradient(256, 256, 65535).astype(np.uint16))
    (record,) = predict_files(export, [image], model=served)
    expected = model(_preprocess(image, 16, False)[None], training=False)
    count = int(expected["num_detections"][0])
    assert record["num_detections"] == count and 0 < count < 4, count  # so the lists are cut
    # served graph vs eager Keras (tolerances.py); boxes are normalised to [0, 1]
    np.testing.assert_allclose(record["scores"], expected["scores"][0, :count], atol=KERNEL_ATOL)
    np.testing.assert_allclose(np.reshape(record["boxes"], (-1, 4)), expected["boxes"][0, :count], atol=KERNEL_ATOL)
    assert record["classes"] == expected["classes"][0, :count].numpy().tolist()
    assert abs(record["mask_area_fraction"] - float(np.mean(expected["mask"][0] >= 0.5))) <= 2 / 224**2
