"""Time per patient of the CT pipeline (selection + classification) against the published way.

    python tools/benchmark.py ct [--ct-slices 35,130,406] [--ct-image-size 512] [--repeats N]
    python -m benchmarks.ct [--slices 35,130,406] [--image-size 512] [--repeats N] [--json OUT]

One synthetic patient per sequence length (one series of 16-bit TIFF slices, written by the
synthetic CT generator) and one model, ``fpn_resnet50v2`` with random weights (the time does
not depend on the weights), are shared by

* ``caaxr``: ``caaxr_tf.ct.patients.classify_patient``: every slice decoded once in threads,
  dark pixels counted on the decoded array, the kept slices classified in batches
  (``--batch-size``, default 4: the fastest per slice on the 2-core CPU) by one traced graph;
* ``reference``: what the published ``Automated_covid_detector`` notebooks do: for selection
  each TIFF is read with ``cv2.imread(IMREAD_UNCHANGED)`` and its region counted, then each
  kept slice is read again and classified alone with ``model.predict`` (batch of one).

With ``--precision bfloat16`` (``caaxr_tf.models.precision``) both paths also run a
bfloat16 copy of the model (``caaxr_bfloat16``, ``reference_bfloat16``), in the same turns;
their verdicts and COVID-slice counts are recorded beside the float32 ones, not required to
match. Both float32 paths give the same verdicts (checked). Figures: seconds per patient (median of the repeats,
taken in turns), their ratio (target >= 3x on a CPU), and the peak resident memory that a
406-slice patient adds to the process beyond the loaded, warmed-up model (target <= 2 GiB),
measured in a fresh child process per path from ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks import child_env

SEQUENCES = (35, 130, 406)
MODEL = "fpn_resnet50v2"
# Slices per model call on the caaxr path. On this CPU (2 shared cores, 512 px) batches of 4
# were fastest per slice (0.66 s; batch 1: 0.84 s, batch 16: 2.8 s); on a GPU use 16 or more.
BATCH_SIZE = 4
PAPER_SECONDS = {35: 2.30, 130: 9.88, 406: 23.65}  # Tesla P100, selection included
TARGET_SPEEDUP = 3.0
MEMORY_LIMIT_GIB = 2.0
RESULT_MARK = "@@CT-BENCHMARK "


def write_patient(out: Path, num_slices: int, seed: int = 0) -> Path:
    """One COVID patient with a single series of ``num_slices`` slices; returns its series folder."""
    from caaxr_tf.data.synthetic_ct import SeriesSpec, _write_series

    spec = SeriesSpec(index=0, patient_index=num_slices, group="covid1", patient_id=f"patient{num_slices}",
                      covid=True, series="SR_2", num_slices=num_slices)
    folder = out / spec.folder
    if not (folder.is_dir() and len(list(folder.glob("*.tif"))) == num_slices):
        _write_series((str(out), spec, seed))
    return folder


def build_model(image_size: int):
    from caaxr_tf.models import build_model as build

    return build(MODEL, num_classes=2, input_shape=(image_size, image_size, 1), weights="none")


def caaxr_patient(series, predict, image_size: int, workers: int, batch_size: int = BATCH_SIZE):
    """The library's path: ``classify_patient`` with a traced batch predictor."""
    from caaxr_tf.ct.patients import classify_patient

    return classify_patient(series.patient_id, [series], predict, image_size, batch_size=batch_size,
                            workers=workers).decision


def reference_patient(paths: Sequence[str], model, image_size: int):
    """The published way: read every TIFF with OpenCV to select, read each kept slice again and
    predict it alone (``model.predict`` on a batch of one)."""
    import cv2

    from caaxr_tf.ct.inputs import fit_raw
    from caaxr_tf.ct.patient import decide_patient
    from caaxr_tf.ct.selection import DARK_BELOW, REGION_COLS, REGION_ROWS

    counts = []
    for path in paths:
        pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        counts.append(int(np.count_nonzero(pixels[REGION_ROWS[0]:REGION_ROWS[1],
                                                  REGION_COLS[0]:REGION_COLS[1]] < DARK_BELOW)))
    threshold = (max(counts) - min(counts)) / 1.5
    covid = []
    for path, count in zip(paths, counts):
        if count > threshold:
            pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            image = pixels[None, :, :, None]
            if image_size != pixels.shape[0]:  # only for runs below the published 512
                image = fit_raw(image, image_size).numpy()
            probabilities = model.predict(image.astype(np.float32), verbose=0)
            covid.append(int(np.argmax(probabilities[0])) == 0)
    return decide_patient(np.array(covid, dtype=bool))


def batch_predictor(model, image_size: int):
    from caaxr_tf.evaluate import predict_function

    predict = predict_function(model)
    return lambda images: np.argmax(predict(images), axis=1) == 0


def time_patients(folders: dict[int, Path], image_size: int, repeats: int, workers: int,
                  log=print, batch_size: int = BATCH_SIZE, precision: str = "float32") -> dict[str, Any]:
    """Seconds per patient of both paths, in turns, plus the verdicts; ``precision`` other
    than float32 adds both paths with a copy of the model in that precision."""
    from caaxr_tf.data.ct_series import find_ct_series

    model = build_model(image_size)
    models = {"": model}
    if precision != "float32":
        from caaxr_tf.models.precision import with_precision

        models[f"_{precision}"] = with_precision(model, precision)
    predictors = {suffix: batch_predictor(m, image_size) for suffix, m in models.items()}
    warm = np.zeros((2, image_size, image_size, 1), np.float32)
    results: dict[str, Any] = {}
    # One untimed pass of both paths over the shortest patient: oneDNN creates its kernels per
    # input shape on first use (batch 16, the last partial batch, batch 1).
    (shortest,) = find_ct_series(folders[min(folders)]).series
    for suffix, m in models.items():
        predictors[suffix](warm)
        m.predict(warm[:1], verbose=0)
        caaxr_patient(shortest, predictors[suffix], image_size, workers, batch_size)
        reference_patient(list(shortest.paths), m, image_size)
    paths = [f"{path}{suffix}" for suffix in models for path in ("caaxr", "reference")]
    for length, folder in folders.items():
        (series,) = find_ct_series(folder).series
        times: dict[str, list[float]] = {name: [] for name in paths}
        decisions = {}
        for _ in range(repeats):
            for name in paths:
                suffix = name[len("caaxr"):] if name.startswith("caaxr") else name[len("reference"):]
                started = time.perf_counter()
                if name.startswith("caaxr"):
                    decision = caaxr_patient(series, predictors[suffix], image_size, workers, batch_size)
                else:
                    decision = reference_patient(list(series.paths), models[suffix], image_size)
                times[name].append(time.perf_counter() - started)
                decisions[name] = decision
        if decisions["caaxr"] != decisions["reference"]:
            raise RuntimeError(f"{length} slices: the two paths disagree: {decisions}")
        caaxr, reference = statistics.median(times["caaxr"]), statistics.median(times["reference"])
        results[str(length)] = {
            "slices": length, "kept": decisions["caaxr"].selected, "covid_slices": decisions["caaxr"].covid_slices,
            "caaxr_seconds": times["caaxr"], "reference_seconds": times["reference"],
            "caaxr_median": caaxr, "reference_median": reference, "speedup": reference / caaxr,
            "caaxr_ms_per_kept_slice": 1000.0 * caaxr / max(1, decisions["caaxr"].selected),
            "paper_seconds_p100": PAPER_SECONDS.get(length),
        }
        for suffix in list(models)[1:]:
            for path in ("caaxr", "reference"):
                name = path + suffix
                results[str(length)].update({
                    f"{name}_seconds": times[name], f"{name}_median": statistics.median(times[name]),
                    f"{name}_covid_slices": decisions[name].covid_slices,
                    f"{name}_same_verdict": decisions[name] == decisions[path]})
            log(f"{length} slices, {suffix[1:]}: caaxr {results[str(length)][f'caaxr{suffix}_median']:.2f} s, "
                f"reference {results[str(length)][f'reference{suffix}_median']:.2f} s")
        log(f"{length} slices ({decisions['caaxr'].selected} kept): caaxr {caaxr:.2f} s, "
            f"reference {reference:.2f} s, {reference / caaxr:.2f}x")
    return results


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: the peak resident set since the process started or ``reset_peak_rss``."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: RSS with the model loaded and warmed up, then the peak over one patient
    (the peak is reset after the warm-up; where it cannot be, the figure is an upper bound)."""
    from caaxr_tf.data.ct_series import find_ct_series

    image_size = spec["image_size"]
    model = build_model(image_size)
    (series,) = find_ct_series(spec["folder"]).series
    if spec["path"] == "caaxr":
        predict = batch_predictor(model, image_size)
        for size in (BATCH_SIZE, 1, 2, 3):
            predict(np.zeros((size, image_size, image_size, 1), np.float32))
    else:
        model.predict(np.zeros((1, image_size, image_size, 1), np.float32), verbose=0)
    baseline = rss_bytes()
    exact = reset_peak_rss()
    if spec["path"] == "caaxr":
        caaxr_patient(series, predict, image_size, spec["workers"])
    else:
        reference_patient(list(series.paths), model, image_size)
    peak = peak_rss_bytes()
    return {"baseline_rss": baseline, "peak_rss": peak, "added_bytes": max(0, peak - baseline),
            "peak_reset": exact}


def measure_memory(folder: Path, image_size: int, workers: int, path: str = "caaxr") -> dict[str, Any]:
    spec = {"folder": str(folder), "image_size": image_size, "workers": workers, "path": path}
    process = subprocess.run([sys.executable, "-m", "benchmarks.ct", "--child", json.dumps(spec)],
                             capture_output=True, text=True, env=child_env())
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"memory child failed (exit {process.returncode}): {process.stderr[-2000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["added_gib"] = result["added_bytes"] / 2**30
    return result


def run(work: Path, slices: Sequence[int] = SEQUENCES, image_size: int = 512, repeats: int = 3,
        workers: int | None = None, memory: bool = True, log=print, batch_size: int = BATCH_SIZE,
        precision: str = "float32") -> dict[str, Any]:
    """The whole ``ct`` benchmark: data (kept in ``work``), timing, memory; a JSON-ready dict."""
    workers = workers or min(8, os.cpu_count() or 1)
    started = time.perf_counter()
    folders = {length: write_patient(work, length) for length in slices}
    log(f"data: {', '.join(f'{n} slices' for n in slices)} in {work} ({time.perf_counter() - started:.0f} s)")
    result: dict[str, Any] = {
        "model": MODEL, "image_size": image_size, "batch_size": batch_size, "repeats": repeats, "workers": workers,
        "precision": precision,
        "patients": time_patients(folders, image_size, repeats, workers, log=log, batch_size=batch_size,
                                  precision=precision),
        "gpu": "not measured",
    }
    if memory:
        longest = max(slices)
        result["memory"] = {path: measure_memory(folders[longest], image_size, workers, path)
                            for path in ("caaxr", "reference")}
        result["memory"]["slices"] = longest
        log(f"memory beyond the model, {longest} slices: caaxr {result['memory']['caaxr']['added_gib']:.3f} GiB, "
            f"reference {result['memory']['reference']['added_gib']:.3f} GiB")
    speedups = [p["speedup"] for p in result["patients"].values()]
    result["targets"] = {
        "speedup_vs_reference": {"needed": TARGET_SPEEDUP, "worst": min(speedups),
                                 "passed": min(speedups) >= TARGET_SPEEDUP},
    }
    if memory:
        added = result["memory"]["caaxr"]["added_gib"]
        result["targets"]["memory_406"] = {"needed_gib": MEMORY_LIMIT_GIB, "added_gib": added,
                                           "passed": added <= MEMORY_LIMIT_GIB}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def table(result: dict[str, Any]) -> str:
    """The timing table beside the paper's (Tesla P100)."""
    lines = ["| slices | kept | caaxr s/patient | reference s/patient | speed-up | paper (P100) s/patient |",
             "|---|---|---|---|---|---|"]
    for item in result["patients"].values():
        lines.append(f"| {item['slices']} | {item['kept']} | {item['caaxr_median']:.2f} | "
                     f"{item['reference_median']:.2f} | {item['speedup']:.2f}x | {item['paper_seconds_p100']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ct", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", default=",".join(map(str, SEQUENCES)), help="sequence lengths")
    parser.add_argument("--image-size", type=int, default=512, help="model input (the published 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: cores, at most 8)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="slices per model call (caaxr path)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="also time both paths with the model in this precision")
    parser.add_argument("--work-dir", default=None, help="keep the synthetic patients here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="caaxr-ct-bench-"))
    result = run(work, [int(n) for n in args.slices.split(",")], args.image_size, args.repeats, args.workers,
                 memory=not args.no_memory, batch_size=args.batch_size, precision=args.precision)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        print(RESULT_MARK + json.dumps(child_memory(json.loads(sys.argv[2]))), flush=True)
        sys.exit(0)
    sys.exit(main())
