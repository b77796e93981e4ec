"""benchmarks.benchmark (tools/benchmark.py): a --quick run's JSON structure (not its speed), the
target arithmetic, the training step against the trainer's, and the PyTorch peer's clean skip."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tolerances import KERNEL_RTOL

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "benchmark.py"

FIGURE_KEYS = {"label", "status", "reason", "unit", "values", "median", "reference", "ratio", "cpu_unit",
               "cpu_values", "cpu_median", "cpu_ratio"}
TARGET_KEYS = {"section", "name", "figure", "reference", "op", "threshold", "description", "value",
               "reference_value", "ratio", "cpu_ratio", "passed", "cpu_passed", "note"}


@pytest.fixture(scope="module")
def bench():
    """The benchmark module (tools/benchmark.py is a thin wrapper around it)."""
    import benchmarks.benchmark

    return benchmarks.benchmark


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def quick_report(tiny_data_root, tmp_path_factory) -> dict:
    """A --quick run of the two sections without models (the cheap ones) on the tiny set."""
    out = tmp_path_factory.mktemp("benchmark") / "quick.json"
    command = [sys.executable, str(SCRIPT), "pipeline", "tfrecords", "--quick", "--repeats", "1",
               "--data-root", str(tiny_data_root), "--json", str(out)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "## targets" in completed.stdout  # the table is printed
    return json.loads(out.read_text())


def test_quick_report_structure(quick_report):
    report = quick_report
    assert report["schema"] == 1
    assert report["settings"]["quick"] is True and report["settings"]["sections"] == ["pipeline", "tfrecords"]
    machine = report["machine"]
    for key in ("cores", "usable_cores", "cpu_model", "gpu", "tensorflow", "keras", "torch", "python"):
        assert key in machine, key
    assert machine["cores"] >= 1 and machine["tensorflow"]
    assert {"before", "during", "after"} <= set(report["load_average"])
    assert report["dataset"]["train_images"] > 0 and report["dataset"]["source"] == "caaxr"
    assert set(report["sections"]) == {"pipeline", "tfrecords"}
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section.get("reason"))
        assert section["figures"] and section["seconds"] > 0
        for key, item in section["figures"].items():
            assert FIGURE_KEYS <= set(item), (name, key)
            if item["status"] == "ok":
                assert item["values"] and all(math.isfinite(v) and v > 0 for v in item["values"]), (name, key)
                assert item["median"] > 0
            else:
                assert item["status"] == "skipped" and item["reason"] and item["median"] is None
            if item["reference"] and item["status"] == "ok":
                reference = section["figures"][item["reference"]]
                if reference["status"] == "ok":
                    assert item["ratio"] == pytest.approx(item["median"] / reference["median"])


def test_quick_report_figures_and_targets(quick_report):
    pipeline = quick_report["sections"]["pipeline"]["figures"]
    assert {"tf_cold", "tf_first_epoch", "tf_warm", "tf_cold_plain", "tf_warm_plain", "limit", "torch", "torch_augment",
            "torch_source"} <= set(pipeline)
    for key in ("tf_cold", "tf_warm", "tf_cold_plain", "tf_warm_plain", "limit"):
        assert pipeline[key]["status"] == "ok" and pipeline[key]["unit"] == "images/s"
    if torch_installed():
        assert pipeline["torch"]["status"] == "ok" and pipeline["torch_source"]["status"] == "ok"
        assert pipeline["torch_source"]["images"] == quick_report["dataset"]["train_images"]
    else:  # CI installs only the dev extra: recorded as skipped, and its targets as not measured
        assert pipeline["torch"]["status"] == "skipped" and "torch" in pipeline["torch"]["reason"]
    tfrecords = quick_report["sections"]["tfrecords"]["figures"]
    assert {"build_w1", "build_w2", "limit_w1", "limit_w2", "peak_rss_small", "peak_rss_large"} <= set(tfrecords)
    assert tfrecords["build_w1"]["images"] == tfrecords["build_w2"]["images"] > 0
    assert tfrecords["peak_rss_large"]["images"] > tfrecords["peak_rss_small"]["images"]
    assert tfrecords["peak_rss_small"]["unit"] == "MiB"

    targets = {t["name"]: t for t in quick_report["targets"]}
    assert {"warm vs PyTorch", "cold vs PyTorch", "cold vs source peer", "warm vs source peer",
            "cold vs decode limit", "warm vs PyTorch, augment_in step", "cold vs PyTorch, augment_in step",
            "cold vs decode limit, augment_in step", "1 worker vs decode limit",
            "2 workers vs decode limit", "2 workers vs 1", "peak memory growth"} == set(targets)
    for target in targets.values():
        assert TARGET_KEYS <= set(target)
        if target["passed"] is None:
            assert target["ratio"] is None and target["note"].startswith("not measured")
            continue
        # the verdict is the ratio of the two medians held against the threshold
        figures = quick_report["sections"][target["section"]]["figures"]
        workers = figures[target["figure"]].get("workers", 1) if target["per_worker"] else 1
        assert target["value"] == pytest.approx(figures[target["figure"]]["median"] / workers)
        assert target["reference_value"] == pytest.approx(figures[target["reference"]]["median"])
        assert target["ratio"] == pytest.approx(target["value"] / target["reference_value"])
        if target["op"] == ">=":
            assert target["passed"] is (target["ratio"] >= target["threshold"])
        else:
            assert target["passed"] is (target["ratio"] <= target["threshold"])
    assert targets["cold vs decode limit"]["passed"] is not None
    assert targets["cold vs decode limit, augment_in step"]["figure"] == "tf_cold_plain"
    assert targets["cold vs decode limit, augment_in step"]["passed"] is not None
    if not torch_installed():
        assert targets["warm vs PyTorch"]["passed"] is None and targets["cold vs source peer"]["passed"] is None


def test_target_arithmetic(bench):
    def item(values, workers=None, status="ok"):
        extra = {"workers": workers} if workers else {}
        return bench.figure(values, "images/s", status=status, **extra)

    figures = {"build_w1": item([40.0], 1), "build_w2": item([60.0, 80.0, 70.0], 2), "limit_w1": item([100.0])}
    sections = {"tfrecords": {"figures": figures}}
    results = {t["name"]: t for t in bench.evaluate_targets(sections)}
    # per worker: 70 / 2 = 35 against 100
    assert results["2 workers vs decode limit"]["ratio"] == pytest.approx(0.35)
    assert results["2 workers vs decode limit"]["passed"] is False
    assert results["1 worker vs decode limit"]["ratio"] == pytest.approx(0.4)
    assert results["2 workers vs 1"]["ratio"] == pytest.approx(70 / 40) and results["2 workers vs 1"]["passed"]
    assert results["peak memory growth"]["passed"] is None  # not measured
    assert "pipeline" not in {t["section"] for t in results.values()}

    skipped = {"tf_warm": item([500.0]), "torch": bench.skipped("images/s", "torch is not installed")}
    result = {t["name"]: t for t in bench.evaluate_targets({"pipeline": {"figures": skipped}})}["warm vs PyTorch"]
    assert result["passed"] is None and "torch is not installed" in result["note"]

    latency = {"keras_m_b1": bench.figure([10.0, 12.0], "ms/image"),
               "saved_pre_m_b1": bench.figure([9.0], "ms/image", reference="keras_m_b1")}
    bench.link_ratios(latency)
    assert latency["saved_pre_m_b1"]["ratio"] == pytest.approx(9.0 / 11.0)
    extra = [{"name": "m", "figure": "saved_pre_m_b1", "reference": "keras_m_b1", "op": "<=", "threshold": 1.0,
              "description": "no slower"}]
    result = bench.evaluate_targets({"inference": {"figures": latency, "extra_targets": extra}})[0]
    assert result["passed"] is True


def test_tables_render(bench):
    figures = {"tf_warm": bench.figure([500.0, 520.0], "images/s", reference="torch", label="warm",
                                       cpu_values=[900.0]),
               "torch": bench.skipped("images/s", "torch is not installed", label="peer")}
    bench.link_ratios(figures)
    report = {
        "machine": {"cpu_model": "cpu", "usable_cores": 2, "cores": 2, "memory_gib": 4, "gpu": None,
                    "tensorflow": "2", "keras": "3", "torch": None},
        "load_average": {"before": [1.0], "during": {}, "after": [1.0]},
        "dataset": {"source": "caaxr"},
        "sections": {"pipeline": {"status": "ok", "figures": figures, "notes": ["a note"]},
                     "inference": {"status": "skipped", "reason": "export missing"}},
        "targets": bench.evaluate_targets({"pipeline": {"figures": figures}}),
    }
    text = bench.report_tables(report)
    assert "| tf_warm" in text and "skipped (torch is not installed)" in text
    assert "skipped: export missing" in text and "n/a (not measured" in text


def test_torch_peer_skips_cleanly_without_torch(bench, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    index = tmp_path / "index.json"
    index.write_text("[]")
    result = bench.child_torch_peer({"index": str(index), "workers": 1, "batch": 2, "augment": False,
                                     "repeats": 1, "min_images": 1})
    assert result["status"] == "skipped" and "torch" in result["reason"]


@pytest.mark.numerics
def test_training_step_replica_updates_the_weights_with_the_loss_of_train_py(bench, tiny_data_root, tmp_path):
    """The replica step is built from train.py's own pieces: one step must change the weights,
    and the loss it reports must be the batch's categorical cross-entropy under the weights it
    started from, computed here."""
    import keras
    import numpy as np

    from caaxr_tf.data.tfrecords import build_tfrecords

    build_tfrecords(tiny_data_root, tmp_path / "tfrecords", protocols=["2class"], workers=1, progress=False,
                    log=lambda line: None)
    args = bench.parse_args(["train", "--quick", "--data-root", str(tiny_data_root), "--work-dir", str(tmp_path)])
    state = bench.Bench(args, tmp_path)
    state.tfrecords = tmp_path / "tfrecords"
    config = bench.train_config(state, "mobilenetv2", "2class",
                                ["image_size=64", "batch_size=2", "model_kwargs.alpha=0.35"])
    keras.utils.set_random_seed(0)
    held = bench.build_held_step(config)
    images, labels = held.batch
    before = [v.numpy().copy() for v in held.model.trainable_variables]
    statistics = [w.copy() for w in held.model.get_weights()]
    held.step(held.iterator)
    reported = float(held.loss_tracker.result())
    after = [v.numpy() for v in held.model.trainable_variables]
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) == len(before)  # every variable moved

    held.model.set_weights(statistics)  # back to the start, BatchNorm statistics included
    probabilities = held.model(images, training=True)
    expected = float(np.mean(keras.losses.categorical_crossentropy(labels, probabilities)))
    # the step's loss from the traced graph, the expectation from eager kernels (tolerances.py)
    assert reported == pytest.approx(expected, rel=KERNEL_RTOL)

    rates = bench.time_held_step(held, warmup=0, steps=1, repeats=2)  # what measure_step times
    assert len(rates) == 2 and all(wall > 0 for wall, _ in rates)
    assert int(held.loss_tracker.count.numpy()) == 3  # the first step and the two timed ones
    cold, warm = bench.measure_input(config, 8)
    assert cold[0] > 0 and warm[0] > 0


def test_latency_repeats_are_taken_in_turns(bench):
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("keras", "saved", "other")}
    timings = bench.time_calls_in_turns(calls, batch=2, repeats=3, min_seconds=0.0)
    assert order[:6] == ["keras", "keras", "saved", "saved", "other", "other"]  # two warm-up calls each
    assert order[6:] == ["keras", "saved", "other"] * 3  # then one repeat of each in turn
    for name in calls:
        assert len(timings[name]["values"]) == len(timings[name]["cpu_values"]) == 3


def test_latency_is_milliseconds_per_image_of_wall_and_cpu_time(bench):
    """A call that sleeps 40 ms on a batch of 4 takes at least 10 ms per image of wall time
    (40 per batch, 0.01 in seconds) and little CPU time; each repeat calls until min_seconds
    have passed (at least two 40 ms calls for 100 ms)."""
    import time as clock

    counts = {"sleep": 0}

    def sleep():
        counts["sleep"] += 1
        clock.sleep(0.04)

    timings = bench.time_calls_in_turns({"sleep": sleep}, batch=4, repeats=2, min_seconds=0.1)["sleep"]
    assert 2 + 2 * 2 <= counts["sleep"] <= 2 + 2 * 3  # two warm-up calls, then 2 or 3 per repeat
    assert all(10.0 <= value < 25.0 for value in timings["values"]), timings["values"]
    assert all(0.0 <= cpu < wall / 2 for cpu, wall in zip(timings["cpu_values"], timings["values"])), timings


def test_count_of_sources_stored_as_they_are(bench, tiny_data_root):
    import cv2

    entries = json.loads((tiny_data_root / "synthetic.json").read_text())["images"]
    files = [str(tiny_data_root / e["path"]) for e in entries if e["path"].endswith((".png", ".jpg"))][:60]
    expected = 0
    for path in files:
        pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if pixels is not None and pixels.ndim == 2 and max(pixels.shape) <= 512:
            expected += 1
    assert 0 < bench.stored_as_they_are(files, 512) == expected < len(files)
    assert bench.stored_as_they_are(files, 0) == sum(
        1 for p in files if (img := cv2.imread(p, cv2.IMREAD_UNCHANGED)) is not None and img.ndim == 2)


def test_source_peer_reads_each_training_image_from_its_source_file(bench, tiny_data_root, tmp_path):
    """The source-reading peer gets exactly fold 1's training images, with the source's path,
    bit depth and inversion (what the synthetic manifest says was written)."""
    import csv

    from caaxr_tf.data.tfrecords import build_tfrecords

    build_tfrecords(tiny_data_root, tmp_path, protocols=["2class"], workers=1, progress=False, log=lambda line: None)
    entries = bench.source_peer_entries("caaxr", tiny_data_root, tmp_path / "2class")
    with open(tmp_path / "2class" / "manifest.csv", newline="") as handle:
        train = {r["image_id"]: int(r["label_index"]) for r in csv.DictReader(handle) if r["split_fold1"] == "train"}
    written = {e["image_id"]: e for e in json.loads((tiny_data_root / "synthetic.json").read_text())["images"]}
    assert len(entries) == len(train) > 0
    by_path = {str(tiny_data_root / e["path"]): e for e in written.values()}
    for path, bit_depth, invert, label in entries:
        image = by_path[path]
        assert label == train[image["image_id"]] and invert == int(image["invert"])
        # BIMCV: BitsStored from the sidecar (12 or 16); CheXpert JPEGs: 0, the file's own range
        assert bit_depth == (image["bit_depth"] if image["source"] == "bimcv" else 0)
    assert sorted(by_path[path]["image_id"] for path, *_ in entries) == sorted(train)
