"""The ct task (raw inputs, metrics, serving) and the patient pipeline (select → classify → decide)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import precision_score, recall_score

from caaxr_tf.ct.patients import classify_patient, evaluate_patients, patient_rows, split_patients
from caaxr_tf.ct.selection import REGION_COLS, REGION_ROWS, select_slices
from caaxr_tf.data.ct_series import find_ct_series
from caaxr_tf.metrics.confusion import ClasswisePrecision, ClasswiseSensitivity, confusion_rates
from caaxr_tf.tasks import get_task

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)

NAMES = ["covid", "normal"]


def ct_task():
    return get_task("ct")(NAMES)


def png16(pixels: np.ndarray) -> bytes:
    return tf.io.encode_png(tf.constant(pixels[:, :, None], tf.uint16)).numpy()


# --------------------------------------------------------------------------- metrics


def test_confusion_rates_and_keras_metrics_match_scikit_learn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 200)
    labels[:5] = 0
    predicted = np.where((rng.random(200) < 0.6) & (labels < 2), labels, rng.integers(0, 2, 200))  # never class 2
    names = ["a", "b", "c"]
    rates = confusion_rates(labels, predicted, names)
    recall = recall_score(labels, predicted, average=None, labels=[0, 1, 2])
    precision = precision_score(labels, predicted, average=None, labels=[0, 1, 2], zero_division=np.nan)
    assert rates["accuracy"] == pytest.approx(np.mean(labels == predicted))
    assert [rates["sensitivity"][n] for n in names] == pytest.approx(list(recall))
    assert [rates["precision"][n] for n in names[:2]] == pytest.approx(list(precision[:2]))
    assert rates["precision"]["c"] is None and np.isnan(precision[2])

    scores = np.eye(3, dtype=np.float32)[predicted] * 0.8 + 0.1  # arg-max = predicted
    sensitivity, precision_metric = ClasswiseSensitivity(3, names), ClasswisePrecision(3, names)
    for metric in (sensitivity, precision_metric):
        for part in (slice(0, 77), slice(77, 200)):  # accumulated over batches
            metric.update_state(np.eye(3, dtype=np.float32)[labels[part]], scores[part])
    np.testing.assert_allclose(sensitivity.result().numpy(), recall, rtol=1e-6)
    np.testing.assert_allclose(precision_metric.result().numpy(), np.nan_to_num(precision), rtol=1e-6)
    assert ClasswiseSensitivity.from_config(sensitivity.get_config()).class_names == names


def test_training_metrics_are_logged_per_class():
    task = ct_task()
    metrics = task.make_metrics()
    targets = np.eye(2, dtype=np.float32)[[0, 0, 0, 1, 1]]
    outputs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.7, 0.3]], np.float32)
    for metric in metrics:
        metric.update_state(*task.metric_inputs(targets, outputs))
    values = task.metric_values(metrics, prefix="val_")
    assert values["val_accuracy"] == pytest.approx(3 / 5)
    assert values["val_sensitivity_covid"] == pytest.approx(2 / 3) and values["val_sensitivity_normal"] == pytest.approx(1 / 2)
    assert values["val_precision_covid"] == pytest.approx(2 / 3) and values["val_precision_normal"] == pytest.approx(1 / 2)
    assert set(task.metric_value_names(metrics, "val_")) == set(values)


# --------------------------------------------------------------------------- inputs and serving


def test_decode_keeps_raw_values_and_resizes_only_to_another_size():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 5000, (512, 512), dtype=np.uint16)
    record = {"image/encoded": tf.constant(png16(raw)), "label": tf.constant(1, tf.int64), "image/id": tf.constant(b"s")}
    task = ct_task()
    decoded = task.decode(record, 512)
    assert decoded["image"].dtype == tf.uint16 and decoded["image"].shape == (512, 512, 1)
    np.testing.assert_array_equal(decoded["image"].numpy()[..., 0], raw)
    small = task.decode(record, 128)["image"].numpy()[..., 0].astype(np.int64)
    reference = cv2.resize(raw.astype(np.float32), (128, 128), interpolation=cv2.INTER_LINEAR)  # half-pixel centres
    assert small.shape == (128, 128) and np.max(np.abs(small - reference)) <= 1.0


def test_serving_inputs_decode_16_bit_png_unscaled_and_refuse_others():
    task = ct_task()
    raw = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512) % 4097
    images = task.serving_inputs(tf.constant([png16(raw), png16(raw[::-1])]), tf.zeros([0], tf.bool),
                                 tf.zeros([0], tf.int32), 512).numpy()
    assert images.dtype == np.float32 and images.shape == (2, 512, 512, 1)
    np.testing.assert_array_equal(images[0, ..., 0], raw.astype(np.float32))
    np.testing.assert_array_equal(images[1, ..., 0], raw[::-1].astype(np.float32))
    eight_bit = tf.io.encode_png(tf.zeros([512, 512, 1], tf.uint8)).numpy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="16-bit greyscale PNG"):
        task.serving_inputs(tf.constant([png16(raw), eight_bit]), tf.zeros([0], tf.bool), tf.zeros([0], tf.int32), 512)

    good = np.full((1, 64, 64, 1), 4000.0, np.float32)
    np.testing.assert_array_equal(task.check_preprocessed(tf.constant(good), 64).numpy(), good)
    for bad, message in ((good + 70000.0, "0..65535"), (good - 5000.0, "0..65535"), (good[:, :32], "shape")):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            task.check_preprocessed(tf.constant(bad), 64)


# --------------------------------------------------------------------------- the patient pipeline


def slice_with(dark: int, marker: bool) -> np.ndarray:
    """A 512x512 raw slice whose selection region holds exactly ``dark`` pixels below 300;
    ``marker``: a bright 64x64 block (the fake classifier's COVID sign) outside the region."""
    pixels = np.full((512, 512), 1000, np.uint16)
    region = pixels[REGION_ROWS[0]:REGION_ROWS[1], REGION_COLS[0]:REGION_COLS[1]].reshape(-1)
    region[:dark] = 100
    pixels[REGION_ROWS[0]:REGION_ROWS[1], REGION_COLS[0]:REGION_COLS[1]] = region.reshape(100, 250)
    if marker:
        pixels[20:84, 20:84] = 4000
    return pixels


def write_series(folder: Path, slices: list[np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for number, pixels in enumerate(slices, 1):
        assert cv2.imwrite(str(folder / f"IM{number:05d}.tif"), pixels)


def covid_if_marked(images: np.ndarray) -> np.ndarray:
    """The fake classifier: COVID when the slice holds a value above 2000."""
    return images.reshape(len(images), -1).max(axis=1) > 2000


# Series A: counts 0..24000, spread 24000, threshold 16000: the tie at 16000 is dropped; kept 2, 3, 4.
# COVID markers on slice 1 (not kept: must not count) and slice 3. Series B: 9 kept slices, no marker.
SERIES_A = [(0, False), (16000, True), (16001, False), (24000, True), (20000, False), (3000, False)]
SERIES_B = [(0, False)] + [(24000, False)] * 9


@pytest.fixture
def patient_folder(tmp_path) -> Path:
    patient = tmp_path / "covid1" / "patient9"
    write_series(patient / "SR_2", [slice_with(d, m) for d, m in SERIES_A])
    write_series(patient / "SR_3", [slice_with(d, m) for d, m in SERIES_B])
    assert cv2.imwrite(str(patient / "SR_3" / "IM00099.tif"), np.zeros((512, 512), np.uint8))  # an 8-bit slice
    return patient


def test_classify_patient_selects_classifies_kept_slices_and_applies_both_thresholds(patient_folder):
    scan = find_ct_series(patient_folder, check_headers=False)  # the 8-bit slice fails when it is decoded
    assert [s.series_id for s in scan.series] == ["patient9/SR_2", "patient9/SR_3"]
    result = classify_patient("patient9", scan.series, covid_if_marked, image_size=512, batch_size=2, workers=2)
    first, second = result.series
    np.testing.assert_array_equal(first.selection.counts, [d for d, _ in SERIES_A])
    assert first.selection.threshold == 16000.0
    assert first.selection.kept_indices == [2, 3, 4] and first.covid == [False, True, False]
    assert second.selection.kept_indices == list(range(1, 10)) and not any(second.covid)
    expected = select_slices(np.stack([slice_with(d, m) for d, m in SERIES_B]))
    np.testing.assert_array_equal(second.selection.kept, expected.kept)
    decision = result.decision
    assert (decision.selected, decision.covid_slices) == (12, 1)
    # threshold 1: one COVID slice is enough; threshold 2: 1 < 12 / 10
    assert decision.covid_threshold1 and not decision.covid_threshold2
    assert result.covid_paths == [str(patient_folder / "SR_2" / "IM00004.tif")]
    assert [(s.path, s.field) for s in result.skipped] == [(str(patient_folder / "SR_3" / "IM00099.tif"),
                                                             "BitsPerSample")]
    # at a smaller model input the slices are resized first; the marker survives, the verdicts too
    small = classify_patient("patient9", scan.series, covid_if_marked, image_size=96, workers=1)
    assert small.decision == decision


def marker_model(image_size: int = 96):
    """A Keras model computing the fake classifier: covid logit max - 2000, normal 2000 - max."""
    import keras

    inputs = keras.Input((image_size, image_size, 1))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(keras.layers.GlobalMaxPooling2D()(inputs)))
    dense.set_weights([np.array([[1.0, -1.0]], np.float32), np.array([-2000.0, 2000.0], np.float32)])
    return model


def test_predict_on_a_patient_folder_prints_the_verdicts(patient_folder, tmp_path, capsys):
    from caaxr_tf import predict
    from caaxr_tf.export import export_model

    export = export_model(marker_model(), tmp_path / "export", task="ct", class_names=NAMES, image_size=96,
                          verify=False)

    single = patient_folder / "SR_2" / "IM00004.tif"
    assert predict.main(["--model", str(export), str(patient_folder.parent), str(single)]) == 0
    patient, slice_record = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert patient["patient"] == "patient9"
    assert (patient["verdict_threshold1"], patient["verdict_threshold2"]) == ("covid", "normal")
    assert (patient["covid_slices"], patient["selected_slices"], patient["slices"]) == (1, 12, 16)
    assert patient["covid_slice_files"] == [str(single)]
    assert len(patient["kept_slices"]) == 12 and patient["kept_slices"][:3] == [
        str(patient_folder / "SR_2" / f"IM0000{i}.tif") for i in (3, 4, 5)]
    assert [s["field"] for s in patient["skipped"]] == ["BitsPerSample"]
    assert slice_record["predicted_class"] == "covid" and slice_record["input"]["format"] == "tiff"


def test_evaluate_patients_counts_verdicts_against_the_group_folders(tiny_ct_root):
    patients = ["patient1", "patient2", "patient3", "patient4"]
    everything = lambda images: np.ones(len(images), bool)  # noqa: E731
    nothing = lambda images: np.zeros(len(images), bool)  # noqa: E731
    summary, results = evaluate_patients(tiny_ct_root, patients, everything, 96, workers=1)
    assert (summary["patients"], summary["covid_patients"]) == (4, 2)
    assert summary["threshold1"] == {"correct": 2, "covid_to_normal": 0, "normal_to_covid": 2, "accuracy": 0.5}
    summary, _ = evaluate_patients(tiny_ct_root, patients, nothing, 96, workers=1)
    assert summary["threshold2"] == {"correct": 2, "covid_to_normal": 2, "normal_to_covid": 0, "accuracy": 0.5}
    # the selected slices are those of the selection command over each usable series
    from caaxr_tf.ct.select import select_series

    scan = find_ct_series(tiny_ct_root)
    expected = sum(select_series(s).selection.num_kept for s in scan.series)
    assert summary["selected_slices"] == expected == sum(r.decision.selected for r in results)
    header, rows = patient_rows(results)
    assert [row[0] for row in rows] == patients and header[-1] == "skipped"


def test_split_patients_reads_the_manifest(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "image_id,patient_id,split_fold1,split_fold2\n"
        "a,patient10,test,test\nb,patient2,train,val\nc,patient2,train,val\nd,patient3,test,test\n")
    assert split_patients(tmp_path, "test", 1) == ["patient3", "patient10"]
    assert split_patients(tmp_path, "val", 2) == ["patient2"]
    with pytest.raises(ValueError, match="no patients in the val split of fold 1"):
        split_patients(tmp_path, "val", 1)


def test_benchmark_paths_agree_with_each_other(patient_folder):
    """The benchmark's reference (OpenCV reads, model.predict per kept slice) and the library's
    path give the same decision as the hand-computed one."""
    from benchmarks import ct as benchmark

    (series, _) = find_ct_series(patient_folder).series
    model = marker_model()
    reference = benchmark.reference_patient(list(series.paths), model, 96)
    ours = benchmark.caaxr_patient(series, benchmark.batch_predictor(model, 96), 96, workers=2)
    assert ours == reference
    assert (ours.selected, ours.covid_slices, ours.covid_indices) == (3, 1, (1,))
    result = {"patients": {"6": {"slices": 6, "kept": 3, "caaxr_median": 0.5, "reference_median": 2.0,
                                 "speedup": 4.0, "paper_seconds_p100": None}}}
    assert "| 6 | 3 | 0.50 | 2.00 | 4.00x |" in benchmark.table(result)


def test_report_tables_have_one_row_per_fold_and_the_mean():
    from caaxr_tf.ct.report import fold_rows, markdown

    def metrics(fold: int, accuracy: float, correct_t2: int) -> dict:
        counts = {"correct": correct_t2, "covid_to_normal": 4 - correct_t2, "normal_to_covid": 0, "accuracy": None}
        return {"fold": fold, "model": "fpn_resnet50v2", "class_names": NAMES, "num_images": 10,
                "accuracy": accuracy, "sensitivity": {"covid": 0.5, "normal": 1.0},
                "precision": {"covid": 1.0, "normal": None},
                "patients": {"patients": 4, "slices": 40, "selected_slices": 20,
                             "threshold1": dict(counts, correct=4, covid_to_normal=0), "threshold2": counts}}

    slice_header, slice_rows, patient_header, patient_rows = fold_rows([metrics(1, 0.8, 2), metrics(2, 0.6, 4)])
    assert slice_header[3:] == ["accuracy", "sens. covid", "sens. normal", "prec. covid", "prec. normal"]
    assert [row[0] for row in slice_rows] == [1, 2, "mean"]
    assert slice_rows[2][3] == "0.7 ± 0.1" and slice_rows[2][7] == "n/a"
    assert patient_rows[1][2:] == [4, "20 / 40", 4, 0, 0, 4, 0, 0]
    assert patient_rows[2][patient_header.index("t2 correct")] == "3 ± 1"
    assert markdown(slice_header, slice_rows).count("\n") == 5


def test_benchmark_memory_peak_can_be_reset_after_the_warm_up():
    from benchmarks.ct import peak_rss_bytes, reset_peak_rss, rss_bytes

    block = np.ones(256 * 2**20 // 8)  # 256 MiB touched, then freed
    del block
    assert peak_rss_bytes() >= rss_bytes() + 200 * 2**20
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert peak_rss_bytes() < rss_bytes() + 100 * 2**20
