"""Issue 17 on the serving side: one EXIF rule for records, training, predict and serving
(case 5), streaming predict that never opens a FIFO (case 12), a sidecar nested too deeply
(case 9), non-finite models refused by export verification (case 6), and the export and
predict weaker spots (stale export folders, empty files, broken links, batch size)."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.images import load_image
from caaxr_tf.tasks.datasets import make_dataset
from caaxr_tf.data.pipeline import parse_record
from caaxr_tf.export import export_model, export_run, list_versions
from caaxr_tf.export import main as export_main
from caaxr_tf.predict import ServedModel, iter_predictions, predict_files
from caaxr_tf.predict import main as predict_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def probe_model() -> keras.Model:
    """A weightless "segmentation" model that also returns each image's column means
    ([N, 224]), which predict reports: a rotated input changes them."""
    inputs = keras.Input((224, 224, 1))
    mask = keras.layers.Rescaling(1 / 255, name="mask")(inputs)
    columns = keras.layers.GlobalAveragePooling1D(name="columns")(keras.layers.Reshape((224, 224))(inputs))
    return keras.Model(inputs, {"mask": mask, "columns": columns})


def make_run(run_dir: Path, network: keras.Model) -> Path:
    run_dir.mkdir(parents=True)
    network.save(run_dir / "best.keras")
    config = {"task": "segmentation", "model": "unet", "protocol": "seg", "fold": 1, "image_size": 224,
              "class_names": ["lesion"], "tfrecords": "/unused"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return run_dir


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> ServedModel:
    export_dir = tmp_path_factory.mktemp("probe") / "probe" / "1"
    export_model(probe_model(), export_dir, task="segmentation")
    return ServedModel(export_dir)


def png(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


def rotated_jpeg(pixels: np.ndarray, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def stored_pixels() -> np.ndarray:
    """40 x 64 (height x width) with a bright band on the left: asymmetric under rotation."""
    pixels = np.full((40, 64), 60, np.uint8)
    pixels[:, :12] = 240
    pixels[30:, 40:] = 150
    return pixels


# --------------------------------------------------------------------------- case 5


def test_exif_orientation_is_ignored_by_records_training_predict_and_serving(probe, tmp_path):
    root = tmp_path / "covid"
    (root / "images").mkdir(parents=True)
    rows = [["patientid", "finding", "view", "modality", "filename"]]
    for index in range(6):
        (root / "images" / f"img{index}.png").write_bytes(png(np.full((40, 64), 20 * index + 10, np.uint8)))
        rows.append([f"p{index}", "COVID-19" if index % 2 else "No Finding", "PA", "X-ray", f"img{index}.png"])
    exif_file = root / "images" / "rotated.jpg"
    exif_file.write_bytes(rotated_jpeg(stored_pixels()))
    rows.append(["p9", "COVID-19", "PA", "X-ray", "rotated.jpg"])
    with open(root / "metadata.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert Image.open(exif_file).getexif()[0x0112] == 6  # a viewer would show it 64 high, 40 wide

    out = tmp_path / "out"
    tfr.build_tfrecords(root, out, source="covid-chestxray", protocols="2class", workers=1, progress=False,
                        log=lambda line: None)
    with open(out / "2class" / "manifest.csv", newline="") as handle:
        split = next(r["split_fold1"] for r in csv.DictReader(handle) if r["image_id"] == "rotated.jpg")
    dataset = make_dataset(out / "2class", split, fold=1, batch_size=16, training=False, augment=False,
                           cache=False, with_ids=True)
    training_view = {i.decode(): image for images, _, ids in dataset for i, image in zip(ids.numpy(), images.numpy())}
    training_columns = training_view["rotated.jpg"][:, :, 0].mean(axis=0)

    served = predict_files(None, [exif_file], model=probe)[0]
    assert "error" not in served, served
    np.testing.assert_allclose(served["columns"], training_columns, atol=2e-5)

    # the rule: pixels as stored, everywhere (the staging decoder and the records' stored size too)
    assert load_image(exif_file).pixels.shape == (40, 64)
    with open(out / "2class" / "summary.json") as handle:
        names = [n for names in json.load(handle)["shards"].values() for n in names]
    sizes = {(int(r["image/height"]), int(r["image/width"])) for name in names
             for r in tf.data.TFRecordDataset(str(out / "2class" / name)).map(parse_record) if r["image/id"] == b"rotated.jpg"}
    assert sizes == {(40, 64)}

    upright = np.rot90(stored_pixels(), k=-1)  # what applying orientation 6 would have given
    upright_columns = probe.loaded.signatures["serving_default"](
        images=tf.constant([png(np.ascontiguousarray(upright))]), invert=tf.constant([False]),
        bit_depth=tf.constant([0]))["columns"].numpy()[0]
    assert np.abs(upright_columns - training_columns).max() > 20  # the check would see a rotation


# --------------------------------------------------------------------------- case 12 and predict weaker spots


def test_predict_streams_batch_by_batch(probe, tmp_path):
    first, later = tmp_path / "first.png", tmp_path / "later.png"
    first.write_bytes(png(stored_pixels()))
    results = iter_predictions(None, [first, later], batch_size=1, model=probe)
    assert next(results)["file"] == str(first)
    later.write_bytes(png(stored_pixels()))  # created only after the first result came out
    second = next(results)
    assert second["file"] == str(later) and "error" not in second, second
    with pytest.raises(StopIteration):
        next(results)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        iter_predictions(None, [first], batch_size=0, model=probe)


def test_predict_cli_skips_fifos_and_names_broken_links_and_empty_files(probe, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png(stored_pixels()))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.png").write_bytes(png(stored_pixels()))
    os.mkfifo(folder / "c.png")
    (folder / "d.png").symlink_to(tmp_path / "gone.png")
    (folder / "e.png").write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "caaxr_tf.predict", "--model", str(probe.path), "--batch-size", "2",
         str(good), str(fifo), str(folder)], env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in lines] == ["good.png", "pipe.png", "b.png", "c.png", "d.png", "e.png"]
    errors = {Path(r["file"]).name: r.get("error", "") for r in lines}
    assert errors["good.png"] == errors["b.png"] == ""
    assert errors["pipe.png"].startswith("file: not a regular file (a FIFO") and errors["c.png"] == errors["pipe.png"]
    assert errors["d.png"] == f"file: broken symbolic link (to {tmp_path / 'gone.png'})"
    assert errors["e.png"] == "file: file is empty (0 bytes)"
    assert result.returncode == 1 and "4 of 6 files failed" in result.stderr


def test_predict_reports_a_deep_sidecar_and_a_huge_image_per_file(probe, tmp_path, capsys):
    deep = tmp_path / "deep.png"
    deep.write_bytes(cv2.imencode(".png", (stored_pixels().astype(np.uint16) * 16))[1].tobytes())
    deep.with_suffix(".json").write_text("{" * 1 + '"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    huge = tmp_path / "huge.png"
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)  # the header of a 900 MP grey PNG
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                     + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    fine = tmp_path / "fine.png"
    fine.write_bytes(png(stored_pixels()))
    results = {Path(r["file"]).name: r for r in predict_files(None, [deep, huge, fine], model=probe)}
    assert results["deep.png"]["error"] == "json: nested too deeply to be read as JSON"
    assert "30000x30000 pixels (900.0 MP) exceed the limit" in results["huge.png"]["error"]
    assert "mask_area_fraction" in results["fine.png"]
    assert predict_main(["--model", str(probe.path), "--batch-size", "0", str(fine)]) == 2
    assert "error: --batch-size must be at least 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- case 6 (export) and stale folders


def nan_model() -> keras.Model:
    inputs = keras.Input((224, 224, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, outputs)
    model.set_weights([np.full(w.shape, np.nan, w.dtype) for w in model.get_weights()])
    return model


def test_export_verification_refuses_a_nan_model(tmp_path, capsys):
    run = make_run(tmp_path / "run", nan_model())
    saved = tmp_path / "saved_models" / "broken"
    assert export_main(["--run", str(run), "--out", str(saved)]) == 2
    err = capsys.readouterr().err
    assert "non-finite values (NaN or Inf)" in err and "'mask'" in err
    assert list_versions(saved) == [] and not [p for p in saved.iterdir() if p.name.startswith(".")]

    unverified = export_run(run, saved, verify=False)  # --no-verify still exports; predict then says why
    result = predict_files(unverified, [Path(__file__).parent / "none.png"])[0]
    assert "file not found" in result["error"]
    image = tmp_path / "x.png"
    image.write_bytes(png(stored_pixels()))
    assert predict_files(unverified, [image])[0]["error"].startswith("model output mask is not finite")


def test_folders_of_killed_exports_are_cleaned_and_a_moved_aside_version_restored(tmp_path):
    run = make_run(tmp_path / "run", probe_model())
    base = tmp_path / "saved_models" / "probe"
    dead = 999_999_999  # no such process
    (base / f".export-4-{dead}.tmp" / "variables").mkdir(parents=True)
    (base / f".retired-1-{dead}.tmp").mkdir()
    (base / f".retired-1-{dead}.tmp" / "saved_model.pb").write_bytes(b"version 1 moved aside by --overwrite")
    live = base / f".export-5-{os.getppid()}.tmp"  # a running process: left alone
    live.mkdir()

    target = export_run(run, base, verify=False)
    assert target == base / "2"  # version 1 is back, so the next free one is 2
    assert (base / "1" / "saved_model.pb").read_bytes() == b"version 1 moved aside by --overwrite"
    assert sorted(p.name for p in base.iterdir()) == sorted(["1", "2", live.name])
