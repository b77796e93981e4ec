"""The protocols of the new systems built from their synthetic sets (and the real covid-chestxray
collection): exact counts against the generators' manifests, masks, targets and CT slices in the
records, and what the records of the existing protocols do not gain."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from caaxr_tf.data import synthetic, synthetic_ct, synthetic_qata
from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.sources import read_source

COMMON_FEATURES = {
    "image/encoded", "image/format", "image/bit_depth", "image/invert", "image/height", "image/width",
    "image/original_height", "image/original_width", "image/id", "image/source", "patient/id", "label",
    "label/name", "bbox/xmin", "bbox/ymin", "bbox/xmax", "bbox/ymax", "bbox/finding", "findings",
}


def build(data_root: Path, out: Path, **kwargs) -> dict:
    options = dict(workers=1, progress=False, log=lambda line: None)
    return tfr.build_tfrecords(data_root, out, **{**options, **kwargs})


def records(protocol_dir: Path) -> dict[str, dict[str, tf.train.Example]]:
    """split -> image id -> Example, from the shards summary.json names."""
    summary = json.loads((protocol_dir / "summary.json").read_text())
    found: dict[str, dict[str, tf.train.Example]] = {}
    for split, names in summary["shards"].items():
        found[split] = {}
        for name in names:
            for raw in tf.data.TFRecordDataset(str(protocol_dir / name)):
                example = tf.train.Example.FromString(raw.numpy())
                found[split][example.features.feature["image/id"].bytes_list.value[0].decode()] = example
    return found


def all_records(protocol_dir: Path) -> dict[str, tf.train.Example]:
    """image id -> Example over the test split and fold 1 (every record once); a grouped-halves
    protocol writes every record once in its ``all`` shards."""
    found = records(protocol_dir)
    if "all" in found:
        assert list(found) == ["all"]
        return found["all"]
    merged = {**found["test"], **found["fold1/train"], **found["fold1/val"]}
    assert len(merged) == len(found["test"]) + len(found["fold1/train"]) + len(found["fold1/val"])
    return merged


def feature(example: tf.train.Example, key: str):
    value = example.features.feature[key]
    return value.bytes_list.value or value.int64_list.value or value.float_list.value


def opencv_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest neighbour written out: output pixel (y, x) takes source pixel
    (floor(y * (1 / (height / H))), floor(x * (1 / (width / W)))), OpenCV's INTER_NEAREST rule."""
    rows = np.minimum(np.floor(np.arange(height) * (1.0 / (height / mask.shape[0]))).astype(int), mask.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (1.0 / (width / mask.shape[1]))).astype(int), mask.shape[1] - 1)
    return mask[rows][:, cols]


def decoded_mask(example: tf.train.Example) -> np.ndarray:
    return tf.io.decode_png(feature(example, "mask/encoded")[0], channels=1).numpy()[..., 0]


def manifest_rows(protocol_dir: Path) -> list[dict[str, str]]:
    with open(protocol_dir / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_grouped(protocol_dir: Path, folds: int) -> None:
    rows = manifest_rows(protocol_dir)
    for fold in range(1, folds + 1):
        splits = defaultdict(set)
        for row in rows:
            splits[row[f"split_fold{fold}"]].add(row["patient_id"])
        assert not splits["train"] & splits["val"] and not splits["test"] & (splits["train"] | splits["val"])


# --------------------------------------------------------------------------- QaTa-COV19


@pytest.fixture(scope="module")
def qata(tmp_path_factory) -> tuple[Path, dict, Path, dict]:
    root = tmp_path_factory.mktemp("qata_tiny")
    manifest = synthetic_qata.generate(root, scale="tiny", seed=0)
    out = tmp_path_factory.mktemp("qata_tfrecords")
    # 64 px: every image (96-128 px) is shrunk, so the masks are resized too
    summaries = build(root, out, source="qata", storage_size=64)
    return root, manifest, out, summaries


def test_qata_infection_counts_and_skips_match_the_manifest(qata):
    root, manifest, out, summaries = qata
    summary = summaries["infection"]
    usable = [e for e in manifest["images"] if e["expect"] == "sample"]
    assert summary["task"] == "infection" and summary["folds"] == 5 and summary["classes"] == ["covid", "control"]
    assert summary["counts"]["total"] == {"covid": sum(e["label"] == "COVID-19" for e in usable),
                                          "control": sum(e["label"] == "control" for e in usable)}
    expected_skips = {(str((root / e["skip_path"]).resolve()), e["skip_field"])
                      for e in manifest["images"] if e["expect"] == "skipped"}
    assert {(s["path"], s["field"]) for s in summary["skipped"]} == expected_skips
    for fold in range(1, 6):
        fold_counts = summary["counts"][f"fold{fold}"]
        assert sum(sum(fold_counts[split].values()) for split in ("train", "val")) + \
            sum(summary["counts"]["test"].values()) == len(usable)
    assert_grouped(out / "infection", 5)


def test_qata_masks_round_trip_and_controls_have_an_empty_mask(qata):
    root, manifest, out, _ = qata
    entries = {e["name"]: e for e in manifest["images"] if e["expect"] == "sample"}
    examples = all_records(out / "infection")
    assert set(examples) == set(entries)
    for image_id, example in examples.items():
        entry = entries[image_id]
        assert set(example.features.feature) == COMMON_FEATURES | {"mask/encoded"}
        height, width = feature(example, "image/height")[0], feature(example, "image/width")[0]
        assert max(height, width) == 64
        if entry["label"] == "control":
            assert feature(example, "mask/encoded") == [b""]
            continue
        source = cv2.imread(str(root / entry["mask_path"]), cv2.IMREAD_GRAYSCALE) >= 128
        expected = opencv_nearest(source.astype(np.uint8) * 255, height, width)
        assert np.array_equal(decoded_mask(example), expected), image_id
        assert 0 < np.count_nonzero(expected) < expected.size


def test_a_changed_mask_changes_the_fingerprint(qata, tmp_path):
    root, manifest, _, _ = qata
    copy = tmp_path / "qata"
    shutil.copytree(root, copy)
    out = tmp_path / "out"
    build(copy, out, source="qata", storage_size=64)
    entry = next(e for e in manifest["images"] if e["expect"] == "sample" and e["label"] == "COVID-19")
    mask_file = copy / entry["mask_path"]
    mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE)
    mask[:, :] = 0
    mask[: mask.shape[0] // 2, : mask.shape[1] // 2] = 255
    cv2.imwrite(str(mask_file), mask)
    with pytest.raises(tfr.OutputConflictError, match="input files or data settings changed"):
        build(copy, out, source="qata", storage_size=64)
    build(copy, out, source="qata", storage_size=64, overwrite=True)
    example = all_records(out / "infection")[entry["name"]]
    height, width = feature(example, "image/height")[0], feature(example, "image/width")[0]
    assert np.array_equal(decoded_mask(example), opencv_nearest(mask, height, width))


# --------------------------------------------------------------------------- CAAXR infection


def test_caaxr_infection_from_the_synthetic_set(tiny_data_root, tmp_path):
    out = tmp_path / "out"
    summaries = build(tiny_data_root, out, protocols=["2class", "infection"])
    manifest = json.loads((tiny_data_root / "synthetic.json").read_text())
    infection_findings = {"consolidation", "ground glass opacity"}
    infected = {e["image_id"]: e for e in manifest["images"]
                if e["category"] == "covid_boxes" and any(b["finding"].lower() in infection_findings for b in e["boxes"])}
    controls = sum(v for k, v in manifest["counts"].items() if k.startswith("chexpert_") and k != "chexpert_lateral")
    summary = summaries["infection"]
    assert summary["counts"]["total"] == {"covid": len(infected), "control": controls}
    assert summary["folds"] == 5 and summary["skipped"] == []
    assert_grouped(out / "infection", 5)

    examples = all_records(out / "infection")
    for image_id, example in examples.items():
        assert set(example.features.feature) == COMMON_FEATURES  # masks come from the boxes
        boxes = sorted(zip(feature(example, "bbox/finding"), *(feature(example, f"bbox/{k}")
                                                               for k in ("xmin", "ymin", "xmax", "ymax"))))
        entry = infected.get(image_id)
        if entry is None:
            assert boxes == [] and feature(example, "label/name") == [b"control"]
            continue
        width, height = entry["width"], entry["height"]
        expected = sorted((b["finding"].encode(), *np.float32([b["x"] / width, b["y"] / height,
                                                                (b["x"] + b["width"]) / width,
                                                                (b["y"] + b["height"]) / height]))
                          for b in entry["boxes"] if b["finding"].lower() in infection_findings)
        assert boxes == expected, image_id
    # the records of an existing protocol gain nothing
    for example in all_records(out / "2class").values():
        assert set(example.features.feature) == COMMON_FEATURES


# --------------------------------------------------------------------------- COVID-CTset


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Path, dict, Path, dict]:
    root = tmp_path_factory.mktemp("ct_tiny")
    manifest = synthetic_ct.generate(root, scale="tiny", seed=0)
    out = tmp_path_factory.mktemp("ct_tfrecords")
    summaries = build(root, out, source="covid-ctset", storage_size=64)  # the protocol keeps 512 x 512
    return root, manifest, out, summaries


def test_ct_slices_keep_their_raw_16_bit_values(ct):
    root, manifest, out, summaries = ct
    summary = summaries["ct"]
    counts = manifest["counts"]
    assert summary["counts"]["total"] == {"covid": counts["labelled_covid"], "normal": counts["labelled_normal"]}
    assert summary["storage_size"] == 0 and summary["folds"] == 5
    expected_skips = {(str(root / bad["path"]), bad["field"]) for series in manifest["series"] for bad in series["bad_files"]}
    assert {(s["path"], s["field"]) for s in summary["skipped"]} == expected_skips
    assert_grouped(out / "ct", 5)

    labelled = {}
    for series in manifest["series"]:
        for item in series["slices"]:
            if item["label"]:
                key = f"{series['patient_id']}_{series['series']}_{Path(item['file']).stem}"
                labelled[key] = (series, item)
    examples = all_records(out / "ct")
    assert set(examples) == set(labelled)
    for image_id, example in examples.items():
        series, item = labelled[image_id]
        assert set(example.features.feature) == COMMON_FEATURES | {"series/id", "slice/index"}
        assert feature(example, "series/id") == [f"{series['patient_id']}/{series['series']}".encode()]
        assert feature(example, "slice/index") == [item["index"]]
        assert feature(example, "label/name") == [item["label"].encode()]
        assert (feature(example, "image/bit_depth")[0], feature(example, "image/format")[0]) == (16, b"png")
        pixels = tf.io.decode_png(feature(example, "image/encoded")[0], channels=1, dtype=tf.uint16).numpy()[..., 0]
        raw = cv2.imread(str(root / item["file"]), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and pixels.shape == (512, 512)
        assert np.array_equal(pixels, raw), image_id
    rows = manifest_rows(out / "ct")
    assert {(r["image_id"], r["series_id"], int(r["slice_index"])) for r in rows} == {
        (k, f"{s['patient_id']}/{s['series']}", i["index"]) for k, (s, i) in labelled.items()}


# --------------------------------------------------------------------------- covid-chestxray (real)


def severity_scores(root: Path) -> dict[str, tuple[float, float]]:
    """The scores file read here on its own: ## comment lines, then a header."""
    lines = (root / "annotations" / "covid-severity-scores.csv").read_text(encoding="utf-8-sig").splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("##")))
    return {r["filename"]: (float(r["geographic_mean"]), float(r["opacity_mean"])) for r in rows}


@pytest.mark.realdata
def test_severity_and_lungs_on_the_real_collection(covid_chestxray_root, tmp_path):
    out = tmp_path / "out"
    summaries = build(covid_chestxray_root, out, source="covid-chestxray", protocols=["severity", "lungs"],
                      storage_size=128, workers=2)
    scores = severity_scores(covid_chestxray_root)
    present = {p.name for p in (covid_chestxray_root / "images").iterdir()}
    assert len(scores) == 94 and sum(name in present for name in scores) == 93
    severity = summaries["severity"]
    assert severity["task"] == "regression" and severity["target_names"] == ["geographic_extent", "opacity"]
    assert severity["counts"]["total"] == {"scored": 93}
    examples = all_records(out / "severity")
    assert set(examples) == {name for name in scores if name in present}
    for image_id, example in examples.items():
        assert set(example.features.feature) == COMMON_FEATURES | {"targets"}
        assert feature(example, "targets") == pytest.approx(scores[image_id], abs=1e-6)
    rows = manifest_rows(out / "severity")
    assert {r["image_id"]: (float(r["target_geographic_extent"]), float(r["target_opacity"])) for r in rows} == \
        {name: scores[name] for name in examples}
    assert severity["split_scheme"] == "grouped_halves" and severity["folds"] == 50
    assert_grouped(out / "severity", 50)

    lungs = summaries["lungs"]
    reading = read_source("covid-chestxray-lungs", covid_chestxray_root)
    assert lungs["counts"]["total"] == {"lungs": len(reading.samples)} and len(reading.samples) > 150
    masks = {s.image_id: s.mask_path for s in reading.samples}
    examples = all_records(out / "lungs")
    assert set(examples) == set(masks)
    for image_id in sorted(examples)[:25]:
        example = examples[image_id]
        height, width = feature(example, "image/height")[0], feature(example, "image/width")[0]
        source = (cv2.imread(masks[image_id], cv2.IMREAD_GRAYSCALE) >= 128).astype(np.uint8) * 255
        assert np.array_equal(decoded_mask(example), opencv_nearest(source, height, width)), image_id


# --------------------------------------------------------------------------- commands


def test_commands_take_their_choices_from_the_registries(tmp_path, capsys):
    code = tfr.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--protocol", "ct"])
    assert code == 2
    assert "unknown protocol(s) ct for source caaxr; known: seg, 2class, 3class, 4class, infection" in \
        capsys.readouterr().err
    assert tfr.parse_args(["--data-root", "d", "--out", "o", "--source", "covid-ctset"]).source == "covid-ctset"
    with pytest.raises(SystemExit):
        tfr.parse_args(["--data-root", "d", "--out", "o", "--source", "nih"])
    with pytest.raises(SystemExit) as caught:
        synthetic.main(["--layout", "ct", "--scale", "paper", "--out", str(tmp_path / "ct")])
    assert caught.value.code == 2
    assert "--scale 'paper' is not a scale of the ct layout; choose from small, tiny" in capsys.readouterr().err
    assert synthetic.main(["--layout", "qata", "--out", str(tmp_path / "qata")]) == 0
    assert Counter(e["expect"] for e in json.loads((tmp_path / "qata" / synthetic_qata.MANIFEST_NAME).read_text())
                   ["images"]) == {"sample": 27, "skipped": 6}
