"""caaxr_tf.predict's promises (README, Predict): exit status 2, --invert, --no-sidecars,
suffix-less DICOM discovery, and outputs of more than two dimensions per image left out."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from caaxr_tf.data.dicom import read_dicom
from caaxr_tf.data.images import encode_png
from caaxr_tf.data.pipeline import preprocess_image
from caaxr_tf.export import export_model
from caaxr_tf.predict import ServedModel, predict_files
from caaxr_tf.predict import main as predict_main

pytestmark = pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")


def bright_mask_model() -> keras.Model:
    """mask = sigmoid(10 (x / 255 - 0.5)): at least 0.5 exactly where the input is >= 127.5,
    so the reported mask area is the share of bright pixels the model was given."""
    inputs = keras.Input((224, 224, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")
    outputs = conv(keras.layers.Rescaling(1 / 255.0, offset=-0.5)(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 10.0, np.float32), np.zeros(1, np.float32)])
    return keras.Model(inputs, outputs)


def bright_share(encoded: bytes, bit_depth: int, invert: bool) -> float:
    pixels = preprocess_image(tf.constant(encoded), bit_depth, invert).numpy()
    return float(np.mean(pixels >= 128))


def ramp(height: int, width: int, high: int) -> np.ndarray:
    """Brighter to the right, up to 80 % of the full range: 37.5 % of it is bright, 62.5 % once
    inverted, none when read with 16 times the range."""
    x = np.linspace(0.0, 0.8, width)[None, :] + np.zeros((height, 1))
    return np.rint(x * high)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("predict_cli") / "saved_models" / "bright"
    return export_model(bright_mask_model(), base / "1", task="segmentation")


def write_dicom(path: Path, pixels: np.ndarray) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.SamplesPerPixel, ds.PhotometricInterpretation = "P1", 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, list[dict], str]:
    code = predict_main(argv)
    done = capsys.readouterr()
    return code, [json.loads(line) for line in done.out.splitlines()], done.err


def test_exit_status_2_when_the_model_cannot_be_loaded_or_no_input_is_found(export, tmp_path, capsys):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), ramp(64, 64, 255).astype(np.uint8))
    code, records, err = run_cli(["--model", str(tmp_path / "no_model"), str(image)], capsys)
    assert code == 2 and records == [] and "cannot load the model" in err
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    code, records, err = run_cli(["--model", str(tmp_path / "broken"), str(image)], capsys)
    assert code == 2 and records == [] and "cannot load the model" in err

    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    code, records, err = run_cli(["--model", str(export), str(empty)], capsys)
    assert code == 2 and records == [] and "no PNG, JPEG or DICOM files found" in err
    assert run_cli(["--model", str(export), str(image)], capsys)[0] == 0  # the same call with an image


def test_invert_flag_and_no_sidecars(export, tmp_path, capsys):
    plain = tmp_path / "plain" / "photo.png"
    plain.parent.mkdir()
    cv2.imwrite(str(plain), ramp(200, 180, 255).astype(np.uint8))
    bimcv = tmp_path / "bimcv" / "sub-S1_ses-E1_run-1_bp-chest_vp-ap_dx.png"
    bimcv.parent.mkdir()
    cv2.imwrite(str(bimcv), ramp(200, 180, 4095).astype(np.uint16))  # 12 bits in a 16-bit PNG
    bimcv.with_suffix(".json").write_text(json.dumps(
        {"00280101": {"vr": "US", "Value": [12]}, "20500020": {"vr": "CS", "Value": ["INVERSE"]}}))

    expected = {  # (file, flags) -> (invert, bit depth) the model should see
        ("plain", ()): (False, 8), ("plain", ("--invert",)): (True, 8),
        ("bimcv", ()): (True, 12), ("bimcv", ("--no-sidecars",)): (False, 16),
        ("bimcv", ("--no-sidecars", "--invert", "--bit-depth", "12")): (True, 12),
    }
    files = {"plain": plain, "bimcv": bimcv}
    shares = set()
    for (name, flags), (invert, bits) in expected.items():
        code, (record,), _ = run_cli(["--model", str(export), *flags, str(files[name])], capsys)
        assert code == 0
        assert record["input"] == {"format": "png", "invert": invert, "bit_depth": bits}, (name, flags)
        share = bright_share(files[name].read_bytes(), bits, invert)
        assert abs(record["mask_area_fraction"] - share) <= 2 / 224**2, (name, flags)
        shares.add(round(share, 3))
    assert len(shares) >= 3  # the flags change what the model sees


def test_suffix_less_dicom_files_are_found_in_folders(export, tmp_path, capsys):
    folder = tmp_path / "series"
    (folder / "deeper").mkdir(parents=True)
    pixels = ramp(120, 100, 4095).astype(np.uint16)
    write_dicom(folder / "deeper" / "IM000001", pixels)
    (folder / "README").write_text("a suffix-less file that is not DICOM")
    (folder / "LOCKFILE").write_bytes(b"\x00" * 200)  # too short for a DICOM preamble
    code, records, _ = run_cli(["--model", str(export), str(folder)], capsys)
    assert code == 0 and [Path(r["file"]).name for r in records] == ["IM000001"]
    assert records[0]["input"] == {"format": "dicom", "invert": False, "bit_depth": 16}
    share = bright_share(encode_png(read_dicom(folder / "deeper" / "IM000001").pixels), 16, False)
    assert abs(records[0]["mask_area_fraction"] - share) <= 2 / 224**2


def test_outputs_with_more_than_two_dimensions_per_image_stay_out_of_the_json(tmp_path, capsys):
    """Mask R-CNN's ``instance_masks`` [N, D, h, w] is exported but not printed; the detections are cut
    to ``num_detections``."""
    ops = keras.ops
    inputs = keras.Input((224, 224, 1), name="image")
    scaled = keras.layers.Rescaling(1 / 255)(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, strides=8)(scaled))
    scores = keras.layers.Dense(3, activation="sigmoid", name="scores")(pooled)
    outputs = {
        "mask": keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(scaled),
        "boxes": keras.layers.Reshape((3, 4))(keras.layers.Dense(12, activation="sigmoid")(pooled)),
        "scores": scores,
        "num_detections": ops.full_like(ops.sum(ops.cast(scores, "int32"), axis=1), 2),
        "instance_masks": keras.layers.Reshape((3, 8, 8))(keras.layers.Dense(192, activation="sigmoid")(pooled)),
    }
    model = keras.Model(inputs, outputs)
    base = tmp_path / "saved_models" / "detector"
    export_model(model, base / "1", task="detection")
    served = ServedModel(base)
    assert "instance_masks" in served.outputs
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), ramp(256, 256, 65535).astype(np.uint16))
    code, (record,), _ = run_cli(["--model", str(base), str(image)], capsys)
    assert code == 0
    assert set(record) == {"file", "mask_area_fraction", "mask_threshold", "num_detections", "boxes", "scores", "input"}
    assert record["num_detections"] == 2 and len(record["boxes"]) == 2 and len(record["scores"]) == 2
    (again,) = predict_files(base, [image], model=served)
    assert "instance_masks" not in again and again["boxes"] == record["boxes"]
