"""Issue 27: CT, infection and input reliability (defects 8, 10, 11, 12 and the weaker spots).

A FIFO under a test is released by ``released_if_opened`` should the code open it, so a
regression fails the test (a wrong report) instead of hanging it; the command-line checks run
in a subprocess with a timeout as well.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from caaxr_tf.data.ct_series import find_ct_series
from caaxr_tf.data.records import SchemaError
from caaxr_tf.data.sources.covid_chestxray_severity import read_severity_scores
from caaxr_tf.data.sources.covid_ctset import read_covid_ctset
from test_reliability_inputs import released_if_opened

REPO = Path(__file__).resolve().parents[1]
FIFO_REASON = "not a regular file (a FIFO (named pipe)); skipped"


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def write_series(folder: Path, count: int = 3, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(1, count + 1):
        path = folder / f"IM{number:05d}.tif"
        assert cv2.imwrite(str(path), rng.integers(0, 3000, (512, 512), dtype=np.uint16))
        paths.append(path)
    return paths


@pytest.fixture
def ct_tree_with_fifos(tmp_path) -> tuple[Path, list[Path]]:
    """covid1/patient1/SR_2 with three slices, a FIFO slice and a suffix-less FIFO (which the
    DICOM search would open to look for the preamble)."""
    root = tmp_path / "ctset"
    series = root / "covid1" / "patient1" / "SR_2"
    write_series(series)
    fifos = [series / "IM00004.tif", series / "IM00005"]
    for fifo in fifos:
        os.mkfifo(fifo)
    return root, fifos


# --------------------------------------------------------------------------- defect 8: FIFOs


def test_ct_series_search_reports_fifos_without_opening_them(ct_tree_with_fifos):
    root, fifos = ct_tree_with_fifos
    for check_headers in (True, False):
        with released_if_opened(fifos[0]), released_if_opened(fifos[1]):
            scan = find_ct_series(root / "covid1" / "patient1", check_headers=check_headers)
        reports = {(s.path, s.field): s.reason for s in scan.skipped}
        assert reports == {(str(fifo), "file"): FIFO_REASON for fifo in fifos}, check_headers
        assert [len(s) for s in scan.series] == [3]
    # a FIFO named as the folder itself is named, not called missing
    with released_if_opened(fifos[0]):
        scan = find_ct_series(fifos[0])
    assert [(s.path, s.field, s.reason) for s in scan.skipped] == [(str(fifos[0]), "path", FIFO_REASON)]


def test_covid_ctset_reader_reports_fifo_slices_and_a_fifo_labels_csv(ct_tree_with_fifos):
    root, fifos = ct_tree_with_fifos
    fifos = [fifos[0], root / "covid1_patient2_SR_2_IM00001.tif", root / "all.csv"]
    for fifo in fifos[1:]:
        os.mkfifo(fifo)
    for check_headers in (True, False):
        with released_if_opened(fifos[0]), released_if_opened(fifos[1]), released_if_opened(fifos[2]):
            result = read_covid_ctset(root, {"check_headers": check_headers})
        reports = {(s.path, s.field): s.reason for s in result.skipped}
        assert reports == {(str(fifo), "file"): FIFO_REASON + ("; slices get no slice labels" if fifo.suffix == ".csv"
                                                              else "") for fifo in fifos}, check_headers
        assert len(result.samples) == 3


def test_ct_select_cli_reports_a_fifo_and_finishes(ct_tree_with_fifos):
    root, fifos = ct_tree_with_fifos
    completed = subprocess.run([sys.executable, "-m", "caaxr_tf.ct.select", str(root)], capture_output=True,
                               text=True, env=subprocess_env(), timeout=120, cwd=REPO)
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    skipped = {r["path"]: r["reason"] for r in records if r["type"] == "skipped"}
    assert skipped == {str(fifo): FIFO_REASON for fifo in fifos}
    assert [r["total"] for r in records if r["type"] == "series"] == [3]


def test_make_tfrecords_covid_ctset_reports_a_fifo_slice_and_finishes(tiny_ct_root, tmp_path):
    root = tmp_path / "ctset"
    shutil.copytree(tiny_ct_root, root)
    series = next(p for p in sorted(root.rglob("SR_*")) if p.is_dir())
    fifo = series / "IM99999.tif"
    os.mkfifo(fifo)
    completed = subprocess.run(
        [sys.executable, "-m", "caaxr_tf.data.tfrecords", "--data-root", str(root), "--out", str(tmp_path / "out"),
         "--source", "covid-ctset", "--workers", "1", "--no-progress"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "ct" / "summary.json").read_text())
    assert {"path": str(fifo), "field": "file", "reason": FIFO_REASON} in summary["skipped"]


def write_severity_collection(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"not decoded by the reader")
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientid", "offset", "finding", "view", "modality", "folder", "filename"])
        writer.writerow([1, 0, "COVID-19", "PA", "X-ray", "images", "a.png"])
    (root / "annotations").mkdir()
    return root / "annotations" / "covid-severity-scores.csv"


def test_severity_scores_file_that_is_a_fifo_is_named_not_opened(tmp_path):
    scores = write_severity_collection(tmp_path)
    os.mkfifo(scores)
    with released_if_opened(scores), pytest.raises(SchemaError) as caught:
        read_severity_scores(tmp_path)
    assert (caught.value.path, caught.value.field, caught.value.reason) == (str(scores.resolve()), "file", FIFO_REASON)
    # metadata.csv as a FIFO (read after the scores file) is named too
    scores.unlink()
    scores.write_text("filename,geographic_mean,opacity_mean\na.png,1,1\n", encoding="utf-8")
    metadata = tmp_path / "metadata.csv"
    metadata.unlink()
    os.mkfifo(metadata)
    with released_if_opened(metadata), pytest.raises(SchemaError) as caught:
        read_severity_scores(tmp_path)
    assert (caught.value.path, caught.value.field, caught.value.reason)[1:] == ("file", FIFO_REASON)
    assert Path(caught.value.path).resolve() == metadata.resolve()


# --------------------------------------------------------------------------- defect 12: slice size at decode


def test_ct_slice_of_another_size_is_skipped_at_decode_even_without_header_checks(tiny_ct_root, tmp_path):
    from caaxr_tf.data import tfrecords as tfr

    root = tmp_path / "ctset"
    shutil.copytree(tiny_ct_root, root)
    with open(root / "all.csv", encoding="utf-8") as handle:
        first = next(csv.DictReader(handle))["filename"]
    group, patient, _, series, name = first.split("_", 4)
    wide = root / group / patient / f"SR_{series}" / name
    assert wide.exists(), wide
    pixels = cv2.imread(str(wide), cv2.IMREAD_UNCHANGED)
    assert cv2.imwrite(str(wide), np.ascontiguousarray(pixels[:, :500]))  # 500 wide, 512 high
    summaries = tfr.build_tfrecords(root, tmp_path / "out", source="covid-ctset", workers=1, progress=False,
                                    log=lambda line: None, data_overrides=["covid_ctset.check_headers=false"])
    reports = [s for s in summaries["ct"]["skipped"] if s["path"] == str(wide)]
    assert reports == [{"path": str(wide), "field": "ImageWidth/ImageLength", "reason": "expected 512x512, found 500x512"}]
    rows = (tmp_path / "out" / "ct" / "manifest.csv").read_text().splitlines()
    assert not any(f"{patient}_SR_{series}_{Path(name).stem}," in row for row in rows)


# --------------------------------------------------------------------------- defect 11: --cam / --overlay


@pytest.fixture(scope="module")
def ct_cam_export(tmp_path_factory) -> Path:
    """A tiny CT classifier exported with the ``cam`` output (``export --cam`` accepts CT runs)."""
    import keras

    from caaxr_tf.export import export_model

    inputs = keras.Input((32, 32, 1))
    features = keras.layers.Conv2D(2, 3, padding="same", name="conv")(keras.layers.Rescaling(1 / 5000)(inputs))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(features))
    return export_model(keras.Model(inputs, outputs), tmp_path_factory.mktemp("ct_cam") / "ct" / "1", task="ct",
                        class_names=["covid", "normal"], image_size=32, cam=True, verify=False)


def test_predict_refuses_cam_and_overlay_on_a_ct_export_instead_of_ignoring_them(ct_cam_export, tmp_path, capsys):
    from caaxr_tf import predict

    patient = tmp_path / "covid1" / "patient1"
    slices = write_series(patient / "SR_2")
    for option in ("--cam", "--overlay"):
        out = tmp_path / option.strip("-")
        code = predict.main(["--model", str(ct_cam_export), option, str(out), str(patient), str(slices[0])])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", (option, captured)
        assert captured.err.startswith(f"error: {option}: ") and "'ct' export" in captured.err, captured.err
        assert not out.exists()
    # without them the same inputs are predicted
    assert predict.main(["--model", str(ct_cam_export), str(slices[0])]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == str(slices[0])


# --------------------------------------------------------------------------- defect 10: external set overlap


def write_manifest(protocol_dir: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """rows: (image_id, patient_id, source, split_fold1)."""
    protocol_dir.mkdir(parents=True, exist_ok=True)
    with open(protocol_dir / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "patient_id", "source", "label", "label_index", "split_fold1"])
        writer.writerows([(i, p, s, "covid", "0", split) for i, p, s, split in rows])
    return protocol_dir


def test_training_overlap_by_image_id_and_by_patient(tmp_path):
    from caaxr_tf.explain.evaluation import training_overlap

    run = write_manifest(tmp_path / "run" / "2class", [("a", "p1", "covid-chestxray", "train"),
                                                       ("b", "p2", "covid-chestxray", "val"),
                                                       ("c", "p3", "covid-chestxray", "test")])
    external = write_manifest(tmp_path / "external" / "2class", [
        ("a", "p9", "covid-chestxray", "test"),   # the same image
        ("b2", "p2", "covid-chestxray", "test"),  # another image of a training patient
        ("c", "p3", "covid-chestxray", "test"),   # the run's own test image: no leak
        ("d", "p1", "chexpert", "test"),          # patient "p1" of another source: no leak
        ("e", "p4", "covid-chestxray", "train")])
    overlap = training_overlap(run, 1, external, "all")
    assert (overlap.image_ids, overlap.by_image_id, overlap.by_patient, overlap.external_images) == (["a", "b2"], 1, 1, 5)
    assert training_overlap(run, 1, external, "train").image_ids == []


@pytest.fixture(scope="module")
def tiny_2class_run(tiny_data_root, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny set's 2class shards and a run folder around an untrained 32-pixel classifier."""
    import keras
    import yaml

    from caaxr_tf.data.tfrecords import build_tfrecords

    tfrecords = tmp_path_factory.mktemp("overlap_tfrecords")
    build_tfrecords(tiny_data_root, tfrecords, source="caaxr", protocols=["2class"], workers=1, storage_size=64,
                    progress=False, log=lambda line: None)
    run_dir = tmp_path_factory.mktemp("overlap_run") / "run"
    run_dir.mkdir()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 1))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    keras.Model(inputs, outputs).save(run_dir / "best.keras")
    config = {"task": "classification", "model": "tiny", "protocol": "2class", "fold": 1, "image_size": 32,
              "batch_size": 8, "tfrecords": str(tfrecords / "2class"), "class_names": ["covid", "non_covid"]}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return tfrecords, run_dir


def test_evaluate_external_refuses_the_runs_own_training_images_or_excludes_them(tiny_2class_run, capsys):
    from caaxr_tf import evaluate

    tfrecords, run_dir = tiny_2class_run
    with open(tfrecords / "2class" / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    trained = sum(row["split_fold1"] in ("train", "val") for row in rows)
    argv = ["--run", str(run_dir), "--tfrecords", str(tfrecords), "--split", "all", "--no-plots"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{trained} of the {len(rows)} images of the external set" in err and "--exclude-overlap" in err, err
    assert not list((run_dir / "eval").glob("external_*")) if (run_dir / "eval").exists() else True

    assert evaluate.main([*argv, "--exclude-overlap"]) == 0
    assert f"{trained} of {len(rows)} external images left out" in capsys.readouterr().out
    (path,) = (run_dir / "eval").glob("external_*_all.json")
    result = json.loads(path.read_text())
    assert result["num_images"] == len(rows) - trained > 0
    assert result["training_overlap"]["excluded"] == result["training_overlap"]["by_image_id"] == trained
    with open(path.with_suffix(".csv"), newline="", encoding="utf-8") as handle:
        assert {row["split"] for row in csv.DictReader(handle)} == {"test"}
    # the run's own test split shares no image or patient with its training data: no refusal
    assert evaluate.main(["--run", str(run_dir), "--tfrecords", str(tfrecords), "--no-plots"]) == 0


# --------------------------------------------------------------------------- weak spots: masks and listings


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def _xray(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (20, 16), dtype=np.uint8)


def _lesion() -> np.ndarray:
    mask = np.zeros((20, 16), np.uint8)
    mask[4:12, 3:9] = 255
    return mask


def test_qata_empty_mask_warns_control_mask_skipped_and_fifos_reported(tmp_path):
    from caaxr_tf.data.sources.qata import read_qata

    images, truths, controls = tmp_path / "Train Set" / "Images", tmp_path / "Train Set" / "Ground-truths", \
        tmp_path / "Control_Group"
    _png(images / "a.png", _xray(1))
    _png(truths / "mask_a.png", _lesion())
    _png(images / "blank.png", _xray(2))
    blank = _png(truths / "mask_blank.png", np.zeros((20, 16), np.uint8))
    _png(controls / "n1.png", _xray(3))
    stray = _png(controls / "mask_n1.png", np.zeros((20, 16), np.uint8))
    fifos = [images / "pipe.png", truths / "mask_pipe2.png", controls / "pipe3.png"]
    for fifo in fifos:
        os.mkfifo(fifo)
    with released_if_opened(fifos[0]), released_if_opened(fifos[1]), released_if_opened(fifos[2]):
        result = read_qata(tmp_path)
    assert sorted(s.image_id for s in result.samples) == ["a.png", "blank.png", "n1.png"]
    assert [(w.path, w.field) for w in result.warnings] == [(str(blank), "mask")]
    assert "empty infection mask" in result.warnings[0].reason
    reports = {(s.path, s.field): s.reason for s in result.skipped}
    for fifo in fifos:
        assert reports.pop((str(fifo), "file")) == FIFO_REASON
    assert reports.pop((str(stray), "file")).startswith("named like a mask ('mask_' prefix) in a control folder")
    assert list(reports) == [(str(tmp_path / "Test Set" / "Images"), "folder")]  # no test set in this tree

    # the record builder passes the reader's warning on, naming the mask
    from caaxr_tf.data import tfrecords as tfr

    for fifo in fifos:
        fifo.unlink()
    for number in range(4, 9):  # enough images of both classes for five folds
        _png(images / f"c{number}.png", _xray(number))
        _png(truths / f"mask_c{number}.png", _lesion())
        _png(controls / f"n{number}.png", _xray(10 + number))
    lines = []
    summaries = tfr.build_tfrecords(tmp_path, tmp_path / "out", source="qata", workers=1, progress=False,
                                    log=lines.append)
    assert summaries["infection"]["warnings"][0].startswith(f"{blank}: mask: empty infection mask")
    assert f"WARNING: {summaries['infection']['warnings'][0]}" in lines


def test_lung_masks_empty_mask_warns_and_fifo_reported(tmp_path):
    from caaxr_tf.data.records import ReadResult, Sample
    from caaxr_tf.data.sources.covid_chestxray_lungs import attach_lung_masks

    images, masks = tmp_path / "images", tmp_path / "masks"
    samples = [Sample(n, n, "covid-chestxray", str(_png(images / f"{n}.png", _xray()))) for n in ("a", "b")]
    _png(masks / "a_mask.png", _lesion())
    blank = _png(masks / "b_mask.png", np.zeros((20, 16), np.uint8))
    fifo = masks / "c_mask.png"
    os.mkfifo(fifo)
    with released_if_opened(fifo):
        result = attach_lung_masks(ReadResult(samples=samples), masks, images)
    assert [s.image_id for s in result.samples] == ["a", "b"]
    assert [(w.path, w.field) for w in result.warnings] == [(str(blank), "mask")]
    assert "empty lung mask" in result.warnings[0].reason
    assert [(s.path, s.field, s.reason) for s in result.skipped] == [(str(fifo), "file", FIFO_REASON)]


# --------------------------------------------------------------------------- weak spots: TIFF pages, DICOM rescale


def test_multi_page_tiff_is_refused_not_read_as_its_first_page(tmp_path):
    from caaxr_tf.data.ct_series import check_ct_tiff, read_ct_tiff
    from caaxr_tf.data.images import load_image
    from caaxr_tf.data.records import InputError

    pages = [np.full((512, 512), value, np.uint16) for value in (1000, 2000)]
    path = tmp_path / "stack.tif"
    assert cv2.imwritemulti(str(path), pages)
    for read in (check_ct_tiff, read_ct_tiff, load_image):
        with pytest.raises(InputError) as caught:
            read(path)
        assert (caught.value.path, caught.value.field) == (str(path), "IFD"), read
        assert caught.value.reason.startswith("multi-page TIFF"), caught.value.reason
    single = tmp_path / "single.tif"
    assert cv2.imwrite(str(single), pages[0])
    assert check_ct_tiff(single).width == 512 and read_ct_tiff(single)[0, 0] == 1000 and load_image(single).bit_depth == 16


def test_dicom_rescale_slope_zero_is_an_error_naming_the_field(tmp_path):
    import pydicom

    from caaxr_tf.data.ct_series import read_ct_dicom
    from caaxr_tf.data.dicom import read_dicom
    from caaxr_tf.data.records import InputError
    from caaxr_tf.data.synthetic_ct import write_dicom_series

    raw = np.random.default_rng(0).integers(0, 3000, (3, 512, 512), dtype=np.uint16)
    paths = write_dicom_series(tmp_path / "series", raw, patient_id="p1", shuffle_names=False)
    ds = pydicom.dcmread(paths[0])
    ds.RescaleSlope = 0
    ds.save_as(paths[0])
    for read in (read_ct_dicom, read_dicom):
        with pytest.raises(InputError) as caught:
            read(paths[0])
        assert (caught.value.path, caught.value.field) == (str(paths[0]), "RescaleSlope"), read
        assert "blank" in caught.value.reason
    scan = find_ct_series(tmp_path / "series")
    assert [(s.path, s.field) for s in scan.skipped] == [(str(paths[0]), "RescaleSlope")]
    assert [len(s) for s in scan.series] == [2]
    assert read_ct_dicom(paths[1]).max() > 0


def test_ct_csv_rows_with_parent_or_absolute_paths_are_reported_not_used_by_basename(tmp_path):
    root = tmp_path / "ctset"
    write_series(root / "covid1" / "patient1" / "SR_2")
    name = "covid1_patient1_SR_2_IM00001.tif"
    rows = [f"../{name}", f"/elsewhere/{name}", "covid1_patient1_SR_2_IM00002.tif", f"sub/../{name.replace('1.tif', '3.tif')}"]
    (root / "all.csv").write_text("filename,class\n" + "".join(f"{row},covid\n" for row in rows), encoding="utf-8")
    result = read_covid_ctset(root)
    reports = {s.field: s.reason for s in result.skipped if s.path == str(root / "all.csv")}
    assert set(reports) == {"row 2: filename", "row 3: filename"}
    assert "points outside" in reports["row 2: filename"] and "absolute path" in reports["row 3: filename"]
    labelled = sorted(s.image_id for s in result.samples if "slice_covid" in s.labels)
    assert labelled == ["patient1_SR_2_IM00002", "patient1_SR_2_IM00003"]


def test_infection_metrics_text_names_the_evaluated_split():
    from caaxr_tf.tasks import get_task

    task = get_task("infection")(["covid", "control"])
    metrics = {"pixel_f1": 0.5, "pixel_precision": 0.4, "pixel_recall": 0.6, "dice": 0.3, "dice_covid": 0.35,
               "iou": 0.2, "sensitivity": 1.0, "specificity": 0.5, "min_pixels": 1, "threshold": 0.5,
               "detection_auc": 0.75}
    assert "(all val pixels;" in task.format_metrics({**metrics, "split": "val"})[0]
    assert "(all test pixels;" in task.format_metrics({**metrics, "split": "test"})[0]


def test_build_warns_of_an_empty_validation_split_and_a_one_class_training_split(tmp_path):
    from caaxr_tf.data import tfrecords as tfr

    counts = {"fold1": {"train": {"covid": 3, "control": 2}, "val": {"covid": 1, "control": 0}},
              "fold2": {"train": {"covid": 4, "control": 0}, "val": {}}}
    warnings = tfr.split_warnings("infection", ["covid", "control"], counts, 2)
    assert warnings == ["infection: fold 2: the validation split is empty (too few images or groups for the folds); "
                        "a run on it cannot validate",
                        "infection: fold 2: the training split holds one class only (covid: 4) of covid, control"]
    assert tfr.split_warnings("seg", ["lesion"], {"fold1": {"train": {"lesion": 3}, "val": {"lesion": 1}}}, 1) == []

    # a QaTa tree with one control image: some fold trains on COVID-19 images only
    images, truths = tmp_path / "Train Set" / "Images", tmp_path / "Train Set" / "Ground-truths"
    for number in range(8):
        _png(images / f"c{number}.png", _xray(number))
        _png(truths / f"mask_c{number}.png", _lesion())
    _png(tmp_path / "Control_Group" / "n.png", _xray(99))
    lines = []
    summary = tfr.build_tfrecords(tmp_path, tmp_path / "out", source="qata", workers=1, progress=False,
                                  log=lines.append)["infection"]
    one_class = [w for w in summary["warnings"] if "the training split holds one class only (covid: " in w]
    assert one_class and all(f"WARNING: {w}" in lines for w in one_class)
    written = json.loads((tmp_path / "out" / "infection" / "summary.json").read_text())
    assert written["warnings"] == summary["warnings"]
