"""Issue 17: reruns into an existing --out, stale staging, damaged shards, the --out lock and
one-line errors of tools/make_tfrecords.py (cases 1, 2, 7, 11 and the lock weaker spot)."""

from __future__ import annotations

import csv
import errno
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import tensorflow as tf

from caaxr_tf.data import staging
from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.locks import FolderLock, FolderLockedError

REPO = Path(__file__).resolve().parents[1]
SEG = dict(protocols="seg", workers=1, progress=False)


def build(data_root: Path, out: Path, **kwargs) -> dict:
    options = {**SEG, "log": lambda line: None, **kwargs}
    return tfr.build_tfrecords(data_root, out, **options)


def make_tfrecords_main():
    spec = importlib.util.spec_from_file_location("make_tfrecords_cli", REPO / "tools" / "make_tfrecords.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def records(protocol_dir: Path) -> dict[str, dict[str, tuple]]:
    """split -> image id -> (stored height, width, the whole parsed Example) from the shards."""
    summary = json.loads((protocol_dir / "summary.json").read_text())
    found: dict[str, dict[str, tuple]] = {}
    for split, names in summary["shards"].items():
        found[split] = {}
        for name in names:
            for raw in tf.data.TFRecordDataset(str(protocol_dir / name)):
                example = tf.train.Example.FromString(raw.numpy())
                feature = example.features.feature
                image_id = feature["image/id"].bytes_list.value[0].decode()
                found[split][image_id] = (feature["image/height"].int64_list.value[0],
                                          feature["image/width"].int64_list.value[0], example)
    return found


def manifest_splits(protocol_dir: Path) -> dict[str, set[str]]:
    """split -> image ids, as manifest.csv assigns them (test, fold<k>/train, fold<k>/val)."""
    with open(protocol_dir / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    splits: dict[str, set[str]] = {"test": {r["image_id"] for r in rows if r["split_fold1"] == "test"}}
    for fold in (1, 2):
        for part in ("train", "val"):
            splits[f"fold{fold}/{part}"] = {r["image_id"] for r in rows if r[f"split_fold{fold}"] == part}
    return splits


def assert_shards_match_manifest(protocol_dir: Path) -> dict[str, dict[str, tuple]]:
    found = records(protocol_dir)
    assert {split: set(ids) for split, ids in found.items()} == manifest_splits(protocol_dir)
    return found


def file_states(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_data(tiny_data_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_data_root, root, ignore=shutil.ignore_patterns("chexpert"))
    return root


def seg_image(root: Path, index: int = 0) -> Path:
    entries = [e for e in json.loads((root / "synthetic.json").read_text())["images"] if e["category"] == "covid_boxes"]
    return root / entries[index]["path"]


def interrupt_after(monkeypatch, count: int) -> None:
    """The shard writer is killed (KeyboardInterrupt) at its ``count``-th record."""
    real, calls = tfr.make_example, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(tfr, "make_example", failing)


# --------------------------------------------------------------------------- case 1


def test_rerun_with_other_arguments_refuses_then_overwrite_writes_exactly_them(tiny_data_root, tmp_path):
    out = tmp_path / "out"
    build(tiny_data_root, out, storage_size=128)
    before = file_states(out)

    with pytest.raises(tfr.OutputConflictError, match=r"seed 0 -> 1") as refused:
        build(tiny_data_root, out, storage_size=128, seed=1)
    assert "--overwrite" in str(refused.value)
    with pytest.raises(tfr.OutputConflictError, match=r"storage_size 128 -> 64; records_per_shard 256 -> 4"):
        build(tiny_data_root, out, storage_size=64, records_per_shard=4)
    assert file_states(out) == before  # refused before writing anything

    build(tiny_data_root, out, storage_size=128, seed=1, overwrite=True)
    summary = json.loads((out / "seg" / "summary.json").read_text())
    assert (summary["seed"], summary["build"]["seed"]) == (1, 1)
    seed1 = assert_shards_match_manifest(out / "seg")  # no test shard holds a train/val image
    fresh = tmp_path / "fresh"
    build(tiny_data_root, fresh, storage_size=128, seed=1)
    assert (out / "seg" / "manifest.csv").read_bytes() == (fresh / "seg" / "manifest.csv").read_bytes()
    assert {s: {i: r[2] for i, r in v.items()} for s, v in seed1.items()} == \
        {s: {i: r[2] for i, r in v.items()} for s, v in records(fresh / "seg").items()}

    build(tiny_data_root, out, storage_size=64, records_per_shard=4, seed=1, overwrite=True)
    stored = assert_shards_match_manifest(out / "seg")
    assert all(max(h, w) <= 64 for split in stored.values() for h, w, _ in split.values())
    summary = json.loads((out / "seg" / "summary.json").read_text())
    shard_names = {name for names in summary["shards"].values() for name in names}
    assert {str(p.relative_to(out / "seg")) for p in (out / "seg").rglob("*.tfrecord")} == shard_names
    assert sum(e["records"] for e in summary["shard_files"].values()) == 30  # each image once: test or its part


def test_seed_changes_the_split_so_a_kept_shard_would_leak(tiny_data_root, tmp_path):
    """The premise of case 1: seeds 0 and 1 assign different test sets."""
    a, b = tmp_path / "a", tmp_path / "b"
    build(tiny_data_root, a, storage_size=32)
    build(tiny_data_root, b, storage_size=32, seed=1)
    assert manifest_splits(a / "seg")["test"] != manifest_splits(b / "seg")["test"]


def test_fixed_input_is_a_changed_input(tiny_data_root, tmp_path):
    root = copy_data(tiny_data_root, tmp_path)
    image = seg_image(root)
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])  # truncated: skipped
    out = tmp_path / "out"
    first = build(root, out, storage_size=64)
    assert sum(first["seg"]["counts"]["total"].values()) == 29

    image.write_bytes(good)  # fixed
    with pytest.raises(tfr.OutputConflictError, match=r"input files or data settings changed"):
        build(root, out, storage_size=64)
    second = build(root, out, storage_size=64, overwrite=True)
    assert sum(second["seg"]["counts"]["total"].values()) == 30
    found = assert_shards_match_manifest(out / "seg")
    assert image.stem in {i for split in found.values() for i in split}


def test_interrupted_run_with_other_arguments_is_discarded_not_mixed(tiny_data_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 20)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_data_root, out, storage_size=48)
    assert list((out / "seg").glob("*.tfrecord")) and not (out / "seg" / "summary.json").exists()
    assert (out / "seg" / tfr.BUILDING_FILE).exists()
    monkeypatch.undo()

    lines: list[str] = []
    build(tiny_data_root, out, storage_size=48, seed=1, log=lines.append)
    assert any("partial outputs" in line and "discarded" in line for line in lines), lines
    fresh = tmp_path / "fresh"
    build(tiny_data_root, fresh, storage_size=48, seed=1)
    ours, clean = assert_shards_match_manifest(out / "seg"), records(fresh / "seg")
    assert {s: {i: r[2] for i, r in v.items()} for s, v in ours.items()} == \
        {s: {i: r[2] for i, r in v.items()} for s, v in clean.items()}
    assert not (out / "seg" / tfr.BUILDING_FILE).exists()


# --------------------------------------------------------------------------- case 2


def test_staging_left_by_a_killed_run_is_not_reused_for_another_storage_size(tiny_data_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_data_root, out, storage_size=96)
    staged = list((out / tfr.STAGING_DIR).glob("*.json"))
    assert len(staged) == 30  # every seg image was staged at 96 px before the writer was killed
    monkeypatch.undo()

    build(tiny_data_root, out, storage_size=40)
    found = assert_shards_match_manifest(out / "seg")
    sides = {max(h, w) for split in found.values() for h, w, _ in split.values()}
    assert sides == {40}, sides
    assert not (out / tfr.STAGING_DIR).exists()


def test_staging_key_covers_the_source_file_and_settings(tiny_data_root, tmp_path):
    sample = tfr.read_sources("caaxr", tiny_data_root, ["caaxr"], tfr.load_config("data"))["caaxr"].samples[0]
    copy = tmp_path / "image.png"
    shutil.copy(sample.path, copy)
    sample = sample.replace(path=str(copy))
    key = staging.staging_key(sample, 64)
    assert staging.staging_key(sample, 64) == key
    assert staging.staging_key(sample, 65) != key
    assert staging.staging_key(sample.replace(bit_depth=8), 64) != key
    assert staging.staging_key(sample.replace(boxes=()), 64) != key
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 1_000_000_000))
    assert staging.staging_key(sample, 64) != key


# --------------------------------------------------------------------------- case 7


def test_damaged_shards_are_found_and_rewritten(tiny_data_root, tmp_path):
    out = tmp_path / "out"
    build(tiny_data_root, out, storage_size=48, records_per_shard=4)
    protocol_dir = out / "seg"
    clean = records(protocol_dir)
    summary = json.loads((protocol_dir / "summary.json").read_text())
    for name, entry in summary["shard_files"].items():  # per-shard counts are the real ones
        assert sum(1 for _ in tf.data.TFRecordDataset(str(protocol_dir / name))) == entry["records"]

    flipped = protocol_dir / summary["shards"]["test"][1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated = protocol_dir / summary["shards"]["fold1/val"][0]
    truncated.write_bytes(truncated.read_bytes()[:100])

    lines: list[str] = []
    build(tiny_data_root, out, storage_size=48, records_per_shard=4, log=lines.append)
    assert any("repair" in line for line in lines) and any(str(truncated) in line for line in lines), lines
    assert not any(str(flipped) in line for line in lines)  # same size: only --verify reads it
    lines.clear()
    build(tiny_data_root, out, storage_size=48, records_per_shard=4, verify=True, log=lines.append)
    assert any(str(flipped) in line and "corrupt" in line for line in lines), lines
    lines.clear()
    build(tiny_data_root, out, storage_size=48, records_per_shard=4, verify=True, log=lines.append)
    assert any("up to date" in line and "verified" in line for line in lines), lines
    stamps = {p: p.stat().st_mtime_ns for p in protocol_dir.rglob("*")}
    lines.clear()
    build(tiny_data_root, out, storage_size=48, records_per_shard=4, overwrite=True, log=lines.append)
    assert any("up to date" in line for line in lines)  # --overwrite replaces other builds only
    assert {p: p.stat().st_mtime_ns for p in protocol_dir.rglob("*")} == stamps
    repaired = records(protocol_dir)
    assert {s: {i: r[2] for i, r in v.items()} for s, v in repaired.items()} == \
        {s: {i: r[2] for i, r in v.items()} for s, v in clean.items()}


# --------------------------------------------------------------------------- lock


def test_a_second_run_on_the_same_out_names_the_holder(tiny_data_root, tmp_path, capsys):
    out = tmp_path / "out"
    with FolderLock(out, purpose="the first run"):
        with pytest.raises(FolderLockedError) as held:
            build(tiny_data_root, out)
        message = str(held.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "the first run" in message
        assert make_tfrecords_main()(["--data-root", str(tiny_data_root), "--out", str(out), "--protocol", "seg",
                                      "--workers", "1", "--no-progress"]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [".lock"]  # nothing else was written


def test_a_lock_file_of_a_dead_run_is_taken_over(tiny_data_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(), "started": "earlier"}))
    build(tiny_data_root, out, storage_size=32)
    assert (out / "seg" / "summary.json").exists() and not (out / ".lock").exists()


# --------------------------------------------------------------------------- case 11 and weaker spots


def test_header_only_study_level_csv_stops_before_writing(tiny_data_root, tmp_path, capsys):
    root = copy_data(tiny_data_root, tmp_path)
    (root / "caaxr" / "Study-Level_Annotations.csv").write_text("image_id,findings\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="protocol seg: no candidate images for class"):
        build(root, out)
    assert not out.exists()
    assert make_tfrecords_main()(["--data-root", str(root), "--out", str(out), "--protocol", "seg", "--workers", "1"]) == 2
    assert "error: protocol seg: no candidate images" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "caaxr=[1,2]"], "'caaxr' is a section"),
        (["--set-protocol", "caaxr.seg.classes=5"], "'caaxr.seg.classes' is a section"),
        (["--set", "caaxr.root=!!python/object/apply:os.getcwd []"], "invalid value"),
        (["--set", "bimcv.frontal_views=pa"], "is a list"),
        (["--workers", "0"], "--workers: must be at least 1"),
        (["--records-per-shard", "-1"], "--records-per-shard: must be at least 1"),
    ],
)
def test_bad_overrides_and_numbers_are_one_line_errors(tiny_data_root, tmp_path, capsys, extra, message):
    argv = ["--data-root", str(tiny_data_root), "--out", str(tmp_path / "out"), "--protocol", "seg", "--no-progress", *extra]
    try:
        code = make_tfrecords_main()(argv)
    except SystemExit as stop:  # argparse rejects the value
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_and_a_corrupt_summary_are_named(tiny_data_root, tmp_path, capsys):
    main = make_tfrecords_main()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["--data-root", str(tiny_data_root), "--out", str(a_file), "--protocol", "seg"]) == 2
    assert f"--out {a_file} exists and is not a folder" in capsys.readouterr().err

    out = tmp_path / "out"
    build(tiny_data_root, out, storage_size=32)
    summary = out / "seg" / "summary.json"
    summary.write_text('{"protocol": "seg", "counts": ')
    argv = ["--data-root", str(tiny_data_root), "--out", str(out), "--protocol", "seg", "--storage-size", "32",
            "--workers", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{summary}: cannot be read as JSON" in err and "--overwrite" in err
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads(summary.read_text())["protocol"] == "seg"


def test_disk_full_while_staging_is_an_error_line_and_leaves_no_partial_file(tiny_data_root, tmp_path, capsys,
                                                                             monkeypatch):
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and f"{os.sep}{tfr.STAGING_DIR}{os.sep}" in str(path) and ".tmp-" in str(path) \
                and str(path).endswith(".png"):
            handle = real_open(path, mode, *args, **kwargs)
            handle.write(b"\x89PNG partial")
            handle.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(staging, "open", full_disk, raising=False)
    out = tmp_path / "out"
    code = make_tfrecords_main()(["--data-root", str(tiny_data_root), "--out", str(out), "--protocol", "seg",
                                  "--storage-size", "64", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and tfr.STAGING_DIR in err and "Traceback" not in err, err
    assert not list(out.rglob("*.tmp-*")) and not list(out.rglob("*.tfrecord"))
    assert not (out / "seg" / "summary.json").exists()
