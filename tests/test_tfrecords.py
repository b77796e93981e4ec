"""make_tfrecords on the tiny synthetic set: counts, splits, determinism, resumption."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import tensorflow as tf

from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.pipeline import parse_record
from caaxr_tf.tasks.datasets import make_dataset

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("seg", "2class", "3class", "4class")


def build(data_root: Path, out: Path, **kwargs) -> dict:
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("log", lambda line: None)
    return tfr.build_tfrecords(data_root, out, **kwargs)


@pytest.fixture(scope="module")
def built(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tfrecords")
    build(tiny_data_root, out, workers=2)
    return out


def read_manifest(protocol_dir: Path) -> list[dict[str, str]]:
    with open(protocol_dir / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def expected_class_totals(data_root: Path) -> dict[str, dict[str, int]]:
    counts = json.loads((data_root / "synthetic.json").read_text())["counts"]
    covid = counts["covid_boxes"] + counts["covid_no_boxes"]
    return {
        "seg": {"lesion": counts["covid_boxes"]},
        "2class": {
            "covid": covid,
            "non_covid": counts["chexpert_healthy"] + counts["chexpert_pneumonia"]
            + counts["chexpert_other"] + counts["chexpert_uncertain"],
        },
        "3class": {
            "covid": covid,
            "non_covid_unhealthy": counts["chexpert_pneumonia"] + counts["chexpert_other"],
            "healthy": counts["chexpert_healthy"],
        },
        "4class": {
            "covid": covid,
            "pneumonia": counts["chexpert_pneumonia"],
            "other_unhealthy": counts["chexpert_other"],
            "healthy": counts["chexpert_healthy"],
        },
    }


def records_per_split(protocol_dir: Path, summary: dict) -> dict[str, Counter]:
    found = {}
    for key, names in summary["shards"].items():
        counter: Counter = Counter()
        for name in names:
            for serialized in tf.data.TFRecordDataset(str(protocol_dir / name)):
                counter[parse_record(serialized)["label/name"].numpy().decode()] += 1
        found[key] = counter
    return found


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_counts_agree_between_sources_manifest_summary_and_shards(built, tiny_data_root, protocol):
    protocol_dir = built / protocol
    summary = json.loads((protocol_dir / "summary.json").read_text())
    rows = read_manifest(protocol_dir)
    assert summary["counts"]["total"] == expected_class_totals(tiny_data_root)[protocol]
    assert dict(Counter(r["label"] for r in rows)) == summary["counts"]["total"]
    assert len({r["image_id"] for r in rows}) == len(rows)

    in_shards = records_per_split(protocol_dir, summary)
    assert dict(in_shards["test"]) == summary["counts"]["test"]
    for fold in (1, 2):
        for split in ("train", "val"):
            from_manifest = Counter(r["label"] for r in rows if r[f"split_fold{fold}"] == split)
            assert dict(in_shards[f"fold{fold}/{split}"]) == summary["counts"][f"fold{fold}"][split] == dict(from_manifest)
    # every split is split in at least two files, so two workers can each read their own
    assert all(len(names) >= 2 for names in summary["shards"].values())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_splits_fixed_test_set_disjoint_validation_and_no_shared_patient(built, protocol):
    rows = read_manifest(built / protocol)
    test_ids = {r["image_id"] for r in rows if r["split_fold1"] == "test"}
    assert test_ids == {r["image_id"] for r in rows if r["split_fold2"] == "test"}
    assert abs(len(test_ids) - len(rows) / 2) <= 2
    val1 = {r["image_id"] for r in rows if r["split_fold1"] == "val"}
    val2 = {r["image_id"] for r in rows if r["split_fold2"] == "val"}
    assert val1 and val2 and not val1 & val2
    for fold in (1, 2):
        patients = defaultdict(set)
        for r in rows:
            patients[r[f"split_fold{fold}"]].add(r["patient_id"])
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]


def test_consolidation_subset_counts_match_manifest(built, tiny_data_root):
    rows = read_manifest(built / "seg")
    summary = json.loads((built / "seg" / "summary.json").read_text())
    manifest = json.loads((tiny_data_root / "synthetic.json").read_text())
    truth = {
        e["image_id"]: any(b["finding"].lower() in ("consolidation", "ground glass opacity") for b in e["boxes"])
        for e in manifest["images"]
    }
    assert all(r["subset_consolidation"] == str(int(truth[r["image_id"]])) for r in rows)
    in_test = sum(1 for r in rows if r["split_fold1"] == "test" and truth[r["image_id"]])
    assert summary["counts"]["subset_consolidation"]["test"] == in_test > 0


def all_output_bytes(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and (p.suffix == ".tfrecord" or p.name == "manifest.csv")
    }


def make_tfrecords_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_tfrecords.py"), *args, "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, timeout=600, **kwargs)


# tools/make_tfrecords.py in a process that SIGKILLs itself while writing record number KILL_AT:
# no exception handler, no finally block and no clean-up runs, as when a machine dies.
KILLED_BUILD = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1] + "/tools")
from caaxr_tf.data import tfrecords as tfr
import make_tfrecords

real, calls = tfr.make_example, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
tfr.make_example = dying
sys.exit(make_tfrecords.main(sys.argv[3:]))
"""


def test_rerun_in_another_process_gives_byte_identical_shards_and_skips_finished_work(built, tiny_data_root, tmp_path):
    """The shards of a build in a separate process (another interpreter, hash seed and worker
    count) equal those of the build made in this one, byte for byte."""
    again = tmp_path / "again"
    done = make_tfrecords_cli("--data-root", str(tiny_data_root), "--out", str(again), "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all_output_bytes(again) == all_output_bytes(built)
    assert not (again / tfr.STAGING_DIR).exists()

    stamps = {p: p.stat().st_mtime_ns for p in again.rglob("*.tfrecord")}
    lines: list[str] = []
    build(tiny_data_root, again, log=lines.append)
    assert sum("up to date" in line for line in lines) == len(tfr.protocols_lib.available_protocols()["caaxr"])
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*.tfrecord")} == stamps


def test_killed_run_resumes_in_a_new_process_to_the_same_bytes(built, tiny_data_root, tmp_path):
    out = tmp_path / "resume"
    common = ["--data-root", str(tiny_data_root), "--out", str(out), "--protocol", "2class"]
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(REPO), "30", *common, "--workers", "1",
                             "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]  # inside the second of the two test shards
    # nothing half-written under a final name, and no summary: the protocol is incomplete
    assert not (out / "2class" / "summary.json").exists()
    finished = sorted(p.relative_to(out).as_posix() for p in (out / "2class").rglob("[!.]*.tfrecord"))
    assert finished == ["2class/test-00000-of-00002.tfrecord"]
    assert list((out / "2class").rglob(".test-00001-of-00002.tmp-*.tfrecord"))  # the shard being written when it died
    first = (out / "2class" / "test-00000-of-00002.tfrecord").stat().st_mtime_ns

    resumed = make_tfrecords_cli(*common, "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "2class" / "test-00000-of-00002.tfrecord").stat().st_mtime_ns == first  # kept, not rewritten
    expected = {k: v for k, v in all_output_bytes(built).items() if k.startswith("2class/")}
    assert all_output_bytes(out) == expected
    assert not list(out.rglob("*.tmp*")) and not (out / tfr.STAGING_DIR).exists()


def test_plain_grey_sources_that_fit_are_stored_as_they_are(built, tiny_data_root):
    """Greyscale JPEG/PNG within the storage size: the record holds the file's own bytes;
    larger images are shrunk and re-encoded as PNG. Either way tf.data decodes what cv2 decoded."""
    import cv2
    import numpy as np

    from caaxr_tf.data.pipeline import decode_uint16

    paths = {i["image_id"]: tiny_data_root / i["path"] for i in json.loads((tiny_data_root / "synthetic.json").read_text())["images"]}
    formats: Counter = Counter()
    summary = json.loads((built / "2class" / "summary.json").read_text())
    for name in summary["shards"]["test"] + summary["shards"]["fold1/train"] + summary["shards"]["fold1/val"]:
        for serialized in tf.data.TFRecordDataset(str(built / "2class" / name)):
            record = parse_record(serialized)
            source = paths[record["image/id"].numpy().decode()]
            data, encoded = source.read_bytes(), record["image/encoded"].numpy()
            original = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            kind = record["image/format"].numpy().decode()
            if max(original.shape) <= summary["storage_size"]:
                assert encoded == data and kind == ("jpeg" if source.suffix == ".jpg" else "png"), source
                stored = original
            else:
                assert encoded != data and kind == "png" and encoded.startswith(b"\x89PNG")
                stored = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
                assert max(stored.shape) == summary["storage_size"]
            scale = 257 if stored.dtype == np.uint8 else 1
            decoded = decode_uint16(tf.constant(encoded)).numpy()[..., 0]
            np.testing.assert_array_equal(decoded, stored.astype(np.int64) * scale)
            formats[(kind, encoded == data)] += 1
    # the tiny set has all three cases
    assert formats[("jpeg", True)] and formats[("png", True)] and formats[("png", False)], formats


def test_sampling_down_is_exact_and_seeded(tiny_data_root, tmp_path):
    overrides = ["caaxr.2class.classes.covid.count=10", "caaxr.2class.classes.non_covid.count=12"]
    first = build(tiny_data_root, tmp_path / "a", protocols="2class", protocol_overrides=overrides)
    assert first["2class"]["counts"]["total"] == {"covid": 10, "non_covid": 12}
    assert first["2class"]["warnings"] == []
    build(tiny_data_root, tmp_path / "b", protocols="2class", protocol_overrides=overrides)
    build(tiny_data_root, tmp_path / "c", protocols="2class", protocol_overrides=overrides, seed=5)
    ids = {d: {r["image_id"] for r in read_manifest(tmp_path / d / "2class")} for d in "abc"}
    assert ids["a"] == ids["b"]
    assert ids["a"] != ids["c"]


def test_cli_reports_unknown_protocol_and_missing_root(tmp_path):
    cli = [sys.executable, str(REPO / "tools" / "make_tfrecords.py")]
    missing = subprocess.run(cli + ["--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "data root not found" in missing.stderr
    assert not (tmp_path / "o").exists()
    bad = subprocess.run(cli + ["--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--protocol", "5class"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_unusable_image_is_replaced_by_the_next_in_the_seeded_order(tiny_data_root, tmp_path):
    """README: a corrupt image among those drawn is replaced by the next one in the same seeded
    order. So with one drawn image corrupted, a draw of 10 gives the clean draw of 11 without it."""
    import shutil

    overrides = ["caaxr.2class.classes.non_covid.count=12"]

    def drawn(root: Path, out: str, covid: int) -> tuple[set[str], dict]:
        summary = build(root, tmp_path / out, protocols="2class",
                        protocol_overrides=overrides + [f"caaxr.2class.classes.covid.count={covid}"])["2class"]
        rows = read_manifest(tmp_path / out / "2class")
        return {r["image_id"] for r in rows if r["label"] == "covid"}, summary

    ten, _ = drawn(tiny_data_root, "clean10", 10)
    eleven, _ = drawn(tiny_data_root, "clean11", 11)
    assert len(ten) == 10 and len(eleven) == 11 and ten < eleven  # one seeded order, drawn from the front

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_data_root, damaged)
    entries = {e["image_id"]: e for e in json.loads((damaged / "synthetic.json").read_text())["images"]}
    victim = sorted(ten)[3]
    path = damaged / entries[victim]["path"]
    path.write_bytes(path.read_bytes()[:200])  # truncated

    got, summary = drawn(damaged, "damaged10", 10)
    assert got == eleven - {victim}
    assert summary["counts"]["total"] == {"covid": 10, "non_covid": 12} and summary["warnings"] == []
    assert [s["path"] for s in summary["skipped"]] == [str(path)]


def test_cli_folds_records_per_shard_storage_size_and_uncertain_positive(tiny_data_root, tmp_path):
    """One run of tools/make_tfrecords.py's command line with --folds 3, --records-per-shard 7,
    --storage-size 0 and --set chexpert.uncertain=positive, checked against the synthetic manifest."""
    import importlib.util

    from caaxr_tf.tasks.datasets import make_dataset

    spec = importlib.util.spec_from_file_location("make_tfrecords_tool", REPO / "tools" / "make_tfrecords.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "out"
    code = tool.main(["--data-root", str(tiny_data_root), "--out", str(out), "--protocol", "3class", "--folds", "3",
                      "--records-per-shard", "7", "--storage-size", "0", "--set", "chexpert.uncertain=positive",
                      "--workers", "1", "--no-progress"])
    assert code == 0
    protocol_dir = out / "3class"
    summary = json.loads((protocol_dir / "summary.json").read_text())

    # uncertain=positive: the five images with an uncertain pathology count as unhealthy, none is excluded
    counts = json.loads((tiny_data_root / "synthetic.json").read_text())["counts"]
    assert summary["counts"]["total"] == {
        "covid": counts["covid_boxes"] + counts["covid_no_boxes"],
        "non_covid_unhealthy": counts["chexpert_pneumonia"] + counts["chexpert_other"] + counts["chexpert_uncertain"],
        "healthy": counts["chexpert_healthy"],
    }
    assert counts["chexpert_uncertain"] > 0 and not any("uncertain" in k for k in summary["excluded"])

    # three folds: three disjoint validation parts, each fold trains on the rest of the non-test half
    rows = read_manifest(protocol_dir)
    assert summary["folds"] == 3 and [k for k in rows[0] if k.startswith("split_fold")] == [
        "split_fold1", "split_fold2", "split_fold3"]
    not_test = {r["image_id"] for r in rows if r["split_fold1"] != "test"}
    vals = [{r["image_id"] for r in rows if r[f"split_fold{k}"] == "val"} for k in (1, 2, 3)]
    assert all(vals) and not (vals[0] & vals[1]) and not (vals[0] & vals[2]) and not (vals[1] & vals[2])
    for k, val in enumerate(vals, start=1):
        assert {r["image_id"] for r in rows if r[f"split_fold{k}"] == "train"} == not_test - val
    assert set(summary["shards"]) == {"test"} | {f"fold{k}/{s}" for k in (1, 2, 3) for s in ("train", "val")}
    fold3 = make_dataset(protocol_dir, "val", fold=3, batch_size=64, with_ids=True)
    assert {i.decode() for _, _, ids in fold3 for i in ids.numpy()} == vals[2]

    # at most 7 records per shard, and no more shards than each part needs (but two at least);
    # a split's shards are those of its parts: the test part, part k (val of fold k), the others (train)
    sizes = {entry["image_id"]: (entry["height"], entry["width"])
             for entry in json.loads((tiny_data_root / "synthetic.json").read_text())["images"]}
    for key, names in summary["shards"].items():
        split, fold = (key, 1) if key == "test" else (key.split("/")[1], int(key[4]))
        expected = sum(1 for r in rows if r[f"split_fold{fold}"] == split)
        per_shard = [sum(1 for _ in tf.data.TFRecordDataset(str(protocol_dir / n))) for n in names]
        assert sum(per_shard) == expected and max(per_shard) <= 7, (key, per_shard)
        parts = {n.split("-")[0] for n in names}
        assert len(parts) == (1 if split != "train" else 4), key  # 5 parts at 50 % test, 10 % val
        for part in parts:
            in_part = sum(c for n, c in zip(names, per_shard) if n.split("-")[0] == part)
            assert sum(1 for n in names if n.split("-")[0] == part) == max(2, -(-in_part // 7)), (key, part)

    # --storage-size 0: every image at its original size, including those above the default 512
    large = 0
    for name in summary["shards"]["test"] + summary["shards"]["fold1/train"] + summary["shards"]["fold1/val"]:
        for serialized in tf.data.TFRecordDataset(str(protocol_dir / name)):
            record = parse_record(serialized)
            stored = (int(record["image/height"]), int(record["image/width"]))
            assert stored == (int(record["image/original_height"]), int(record["image/original_width"]))
            image_id = record["image/id"].numpy().decode()
            if image_id in sizes:  # BIMCV ids; CheXpert ids are paths
                assert stored == sizes[image_id]
            large += max(stored) > 512
    assert large > 0


def test_each_image_is_written_once_and_folds_are_assembled_from_part_shards(built):
    protocol_dir = built / "2class"
    summary = json.loads((protocol_dir / "summary.json").read_text())
    rows = read_manifest(protocol_dir)
    ids_in: dict[str, list[str]] = {}
    for path in sorted(protocol_dir.rglob("*.tfrecord")):
        name = str(path.relative_to(protocol_dir))
        ids_in[name] = [parse_record(r)["image/id"].numpy().decode() for r in tf.data.TFRecordDataset(str(path))]
    listed = {name for names in summary["shards"].values() for name in names}
    assert set(ids_in) == listed == set(summary["shard_files"])
    written = [image_id for ids in ids_in.values() for image_id in ids]
    assert sorted(written) == sorted(r["image_id"] for r in rows)  # every image exactly once
    for fold in (1, 2):
        for split in ("train", "val"):
            expected = sorted(r["image_id"] for r in rows if r[f"split_fold{fold}"] == split)
            assert sorted(i for name in summary["shards"][f"fold{fold}/{split}"] for i in ids_in[name]) == expected
    # fold k validates on part k and trains on the other parts' shards
    assert summary["shards"]["fold1/val"] == [n for n in ids_in if n.startswith("parts/part1-")]
    assert set(summary["shards"]["fold2/train"]) == {n for n in ids_in if n.startswith("parts/") and "/part2-" not in n}
    # and the pipeline reads a fold as before
    dataset = make_dataset(protocol_dir, "train", fold=2, batch_size=16, image_size=32, augment=False,
                           cache=False, with_ids=True)
    seen = sorted(i.decode() for _, _, ids in dataset.as_numpy_iterator() for i in ids)
    assert seen == sorted(r["image_id"] for r in rows if r["split_fold2"] == "train")
