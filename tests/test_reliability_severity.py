"""Issue 27: the severity defects (scores reader, protocol and run_features commands, splits,
the build's --folds), each reported as a clear error or fixed, on hand-made tiny collections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caaxr_tf.data.records import SchemaError
from caaxr_tf.data.sources.covid_chestxray_severity import read_score_rows
from test_severity_data import write_collection
from test_severity_halves import protocol_dir, write_feature_run  # noqa: F401  (protocol_dir: a fixture)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- #
# 1. a scores file that holds one blank line
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("content", [b"\n", b"\r\n", b"## comment,,\n\n", b"\n\r\n  \n"])
def test_blank_scores_file_is_a_schema_error_naming_the_file(tmp_path, content):
    path = tmp_path / "scores.csv"
    path.write_bytes(content)
    with pytest.raises(SchemaError) as caught:
        read_score_rows(path)
    assert caught.value.path == str(path) and caught.value.field == "header"
    assert "no header line" in caught.value.reason and "filename" in caught.value.reason


def test_blank_lines_before_the_header_are_skipped_and_counted(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_bytes(b"## c,,\r\n\r\nfilename,geographic_mean,opacity_mean\r\nx.png,1,2\r\n")
    assert read_score_rows(path) == [(4, {"filename": "x.png", "geographic_mean": "1", "opacity_mean": "2"})]


def test_blank_scores_file_in_the_protocol_command_and_the_build(tmp_path, capsys):
    from caaxr_tf.data.tfrecords import main as build_main
    from caaxr_tf.severity.protocol import main

    scores = write_collection(tmp_path / "data", [[1, 0, "COVID-19", "PA", "X-ray", "images", "a.png"]], [],
                              images=["a.png"])
    scores.write_bytes(b"\r\n")
    capsys.readouterr()
    assert main(["--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "covid-severity-scores.csv: header: no header line" in err
    assert build_main(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                       "--source", "covid-chestxray", "--protocol", "severity", "--workers", "1",
                       "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "covid-severity-scores.csv: header: no header line" in err


# --------------------------------------------------------------------------- #
# the score range message prints the value as read, not rounded to 6 digits
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("text, reason", [
    ("8.0000001", "8.0000001 is outside 0..8"),
    ("-0.0000001", "-1e-07 is outside 0..8"),
    ("8.1", "8.1 is outside 0..8"),
    ("9", "9 is outside 0..8"),
    ("8", None),
])
def test_score_outside_its_range_prints_enough_digits(text, reason):
    from caaxr_tf.data.sources.covid_chestxray_severity import TARGETS, _parse_score

    value, problem = _parse_score(text, TARGETS[0])
    assert (problem or None) == reason
    assert (value is None) == (reason is not None)


# --------------------------------------------------------------------------- #
# 2. user errors in the severity commands: one error line, no traceback
# --------------------------------------------------------------------------- #


def scored_collection(root: Path, patients: list[int]) -> Path:
    """A collection whose reader needs no image decoding: one scored PA image per entry."""
    names = [f"img{i}.png" for i in range(len(patients))]
    write_collection(root, [[p, 0, "COVID-19", "PA", "X-ray", "images", n] for p, n in zip(patients, names)],
                     ["filename,geographic_mean,opacity_mean"] + [f"{n},{i % 8},{i % 6}" for i, n in enumerate(names)],
                     images=names)
    return root


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)


@pytest.mark.parametrize("args, message", [
    (["--splits", "0"], "--splits: must be at least 1, got 0"),
    (["--first-seed", "-1"], "--first-seed: must be at least 0, got -1"),
    (["--first-seed", str(2**32 - 2), "--splits", "3"], "seeds go up to 4294967295"),
])
def test_protocol_command_rejects_bad_split_arguments(tmp_path, capsys, args, message):
    from caaxr_tf.severity.protocol import main

    data = scored_collection(tmp_path / "data", [1, 2, 3, 4])
    with pytest.raises(SystemExit) as caught:
        main(["--data", str(data), *args])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err


def test_protocol_command_with_one_patient_or_an_unusable_output(tmp_path, capsys):
    from caaxr_tf.severity.protocol import main

    one = scored_collection(tmp_path / "one", [7, 7, 7])
    capsys.readouterr()
    assert main(["--data", str(one)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("error: 3 usable scored image(s) of 1 patient(s); "
                                    "the grouped half splits need at least 2 patients")
    assert captured.out == ""

    data = scored_collection(tmp_path / "data", [1, 2, 3, 4])
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for option, path, reason in [("--plot", tmp_path / "folder", "is a folder"),
                                 ("--json", tmp_path / "folder", "is a folder"),
                                 ("--plot", tmp_path / "file" / "p.png", "is not a folder")]:
        assert main(["--data", str(data), "--splits", "2", option, str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: {option} {path}") and reason in captured.err, captured.err
        assert captured.out == ""  # refused before the work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file", "folder", "one"]
    assert list((tmp_path / "folder").iterdir()) == []


def test_protocol_command_errors_have_no_traceback_in_a_process(tmp_path):
    data = scored_collection(tmp_path / "data", [1, 2, 3])
    (tmp_path / "folder").mkdir()
    done = run_module("caaxr_tf.severity.protocol", "--data", str(data), "--plot", str(tmp_path / "folder"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == f"error: --plot {tmp_path / 'folder'} is a folder; expected a file name"


def test_run_features_refuses_unusable_outputs_before_the_work(protocol_dir, tmp_path, capsys):
    from caaxr_tf.severity import run_features as rf

    write_feature_run(tmp_path / "run", protocol_dir)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for option, path, reason in [("--json", tmp_path / "folder", "is a folder; expected a file name"),
                                 ("--plots", tmp_path / "file", "is not a folder"),
                                 ("--json", tmp_path / "file" / "a.json", f"{tmp_path / 'file'} is not a folder")]:
        capsys.readouterr()
        assert rf.main(["--tfrecords", str(protocol_dir), "--run", str(tmp_path / "run"), "--splits", "2",
                        option, str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: {option} {path} ") and reason in captured.err, captured.err
        assert captured.out == ""  # refused before the features and the table
    assert (tmp_path / "file").read_text() == "x" and list((tmp_path / "folder").iterdir()) == []


# --------------------------------------------------------------------------- #
# 3. the splits do not depend on the hash seed; "2", "02" and "+2" are one patient
# --------------------------------------------------------------------------- #

# patient ids that tie as integers; fifteen images, one per id
TIED_IDS = ["2", "02", "+2", "5", "05", "+5", "7", "07", "11", "011", "3", "13", "4", "04", "+4"]

BUILD_AND_DIGEST = """
import hashlib, json, sys
from pathlib import Path
from caaxr_tf.data.tfrecords import build_tfrecords
data, out = Path(sys.argv[1]), Path(sys.argv[2])
build_tfrecords(data, out, source="covid-chestxray", protocols=["severity"], folds=4, workers=1,
                records_per_shard=50, progress=False, log=lambda line: None)
summary = json.loads((out / "severity" / "summary.json").read_text())
print(hashlib.sha256((out / "severity" / "manifest.csv").read_bytes()).hexdigest())
print(summary["fingerprint"])
print(json.dumps(summary["split_members"], sort_keys=True))
"""


def test_half_splits_are_byte_identical_under_two_hash_seeds_and_zero_padded_ids_are_one_patient(tmp_path):
    import cv2
    import numpy as np

    names = [f"img{i}.png" for i in range(len(TIED_IDS))]
    write_collection(tmp_path / "data", [[p, 0, "COVID-19", "PA", "X-ray", "images", n] for p, n in zip(TIED_IDS, names)],
                     ["filename,geographic_mean,opacity_mean"] + [f"{n},{i % 8},{i % 6}" for i, n in enumerate(names)],
                     images=[])
    for i, name in enumerate(names):
        cv2.imwrite(str(tmp_path / "data" / "images" / name), np.full((16, 16), i * 10, np.uint8))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    running = [subprocess.Popen([sys.executable, "-c", BUILD_AND_DIGEST, str(tmp_path / "data"), str(tmp_path / f"out{seed}")],
                                env={**env, "PYTHONHASHSEED": str(seed)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for seed in (1, 2)]
    outputs = []
    for process in running:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1]  # manifest.csv bytes, fingerprint and every fold's members
    assert (tmp_path / "out1" / "severity" / "manifest.csv").read_bytes() == \
        (tmp_path / "out2" / "severity" / "manifest.csv").read_bytes()

    members = json.loads(outputs[0].splitlines()[2])
    of_patient: dict[int, list[str]] = {}
    for name, patient in zip(names, TIED_IDS):
        of_patient.setdefault(int(patient), []).append(name)
    for fold in range(1, 5):
        split_of = {name: split for split in ("train", "val", "test") for name in members[f"fold{fold}/{split}"]}
        for patient, images in of_patient.items():  # "2", "02" and "+2" are one patient: one split
            assert len({split_of[name] for name in images}) == 1, (fold, patient, images)


def test_patient_keys_and_their_order():
    from caaxr_tf.severity.splits import grouped_half_split, ordered_groups, patient_key

    assert [patient_key(p) for p in ("2", "02", "+2", " 2 ", 2, "-0", "a2", " b ")] == \
        ["2", "2", "2", "2", "2", "0", "a2", "b"]
    assert ordered_groups(["10", "02", "2", "+2", "9"]) == ["2", "9", "10"]
    split = grouped_half_split(["2", "02", "+2", "3"], seed=0)
    assert sorted(split.train.tolist() + split.test.tolist()) == [0, 1, 2, 3]
    assert {0, 1, 2} <= set(split.train.tolist()) or {0, 1, 2} <= set(split.test.tolist())


# --------------------------------------------------------------------------- #
# 6. --folds above 5 for --protocol severity (documented: 50 splits)
# --------------------------------------------------------------------------- #


def test_folds_are_checked_only_for_the_selected_protocols(tmp_path, capsys):
    from caaxr_tf.data.tfrecords import build_tfrecords, main as build_main

    data = scored_collection(tmp_path / "data", [1, 2, 3, 4, 5])
    for name in (f"img{i}.png" for i in range(5)):  # the build decodes the images
        import cv2
        import numpy as np

        cv2.imwrite(str(data / "images" / name), np.full((16, 16), 100, np.uint8))
    capsys.readouterr()
    assert build_main(["--data-root", str(data), "--out", str(tmp_path / "out"), "--source", "covid-chestxray",
                       "--protocol", "severity", "--folds", "50", "--workers", "1", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "severity" / "summary.json").read_text())
    assert summary["folds"] == 50 and len(summary["split_members"]) == 150
    # the parts protocols keep their limit when they are the ones selected
    for protocols in (["2class"], ["severity", "lungs"], "all"):
        with pytest.raises(ValueError, match="folds must be between 1 and 5, got 6"):
            build_tfrecords(data, tmp_path / "other", source="covid-chestxray", protocols=protocols, folds=6,
                            workers=1, progress=False, log=lambda line: None)
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- #
# 7. a corrupt shard in run_features is named, as evaluate names it
# --------------------------------------------------------------------------- #


def test_run_features_names_a_corrupt_shard(protocol_dir, tmp_path, capsys):
    import shutil

    from caaxr_tf.severity import run_features as rf
    from test_reliability_train import flip_a_byte

    copy = tmp_path / "severity"
    shutil.copytree(protocol_dir, copy)
    write_feature_run(tmp_path / "run", copy)
    shard = copy / json.loads((copy / "summary.json").read_text())["shards"]["all"][1]
    flip_a_byte(shard)
    capsys.readouterr()
    assert rf.main(["--tfrecords", str(copy), "--run", str(tmp_path / "run"), "--splits", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: corrupt TFRecord shard: {shard}: corrupt TFRecord data"), captured.err
    assert "make_tfrecords.py --verify" in captured.err and captured.out == ""


# --------------------------------------------------------------------------- #
# 4. two runs that differ only in their config are two rows of the run_features table
# --------------------------------------------------------------------------- #


def test_two_runs_with_the_same_model_protocol_and_fold_are_two_rows(protocol_dir, tmp_path, capsys):
    import yaml

    from caaxr_tf import runs
    from caaxr_tf.severity import run_features as rf

    for name in ("run_a", "run_b"):  # two runs with the same model, protocol, fold and feature kind
        write_feature_run(tmp_path / name, protocol_dir)
    config = yaml.safe_load((tmp_path / "run_b" / runs.CONFIG_FILE).read_text())
    (tmp_path / "run_b" / runs.CONFIG_FILE).write_text(yaml.safe_dump({**config, "base_filters": 8}))
    scored, results = rf.evaluate_run_features(protocol_dir, [(tmp_path / "run_a", None), (tmp_path / "run_b", None)],
                                               num_splits=2)
    names = [r.name for r in results]
    assert len(set(names)) == 3 and "run_a" in names[1] and "run_b" in names[2], names
    capsys.readouterr()
    assert rf.main(["--tfrecords", str(protocol_dir), "--run", str(tmp_path / "run_a"),
                    "--run", str(tmp_path / "run_b"), "--splits", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "penultimate" in line]
    assert len(rows) == 2 and "run_a" in rows[0] and "run_b" in rows[1], rows

    # the same folder name under two parents: the rows still differ
    (tmp_path / "other").mkdir()
    write_feature_run(tmp_path / "other" / "run_a", protocol_dir)
    _, results = rf.evaluate_run_features(protocol_dir, [(tmp_path / "run_a", None), (tmp_path / "other" / "run_a", None)],
                                          num_splits=1)
    assert len({r.name for r in results}) == 3, [r.name for r in results]
    with pytest.raises(ValueError, match="run_a is given twice with feature kind penultimate"):
        rf.evaluate_run_features(protocol_dir, [(tmp_path / "run_a", None), (tmp_path / "run_a", "penultimate")],
                                 num_splits=1)


# --------------------------------------------------------------------------- #
# 5. a run trained on the severity protocol itself is refused
# --------------------------------------------------------------------------- #


def test_run_trained_on_the_scored_images_is_refused(protocol_dir, tmp_path, capsys):
    import shutil

    import yaml

    from caaxr_tf import runs
    from caaxr_tf.severity import run_features as rf

    def configure(run: Path, **changes) -> Path:
        config = yaml.safe_load((run / runs.CONFIG_FILE).read_text())
        (run / runs.CONFIG_FILE).write_text(yaml.safe_dump({**config, **changes}))
        return run

    # trained on fold 2 of this very protocol folder, of a copy of it, or of a folder no longer there
    copy = tmp_path / "copied" / "severity"
    shutil.copytree(protocol_dir, copy)
    cases = {
        "same": dict(protocol="severity", task="regression", fold=2, tfrecords=str(protocol_dir)),
        "copy": dict(protocol="severity", task="regression", fold=3, tfrecords=str(copy)),
        "gone": dict(protocol="severity", task="regression", fold=1, tfrecords=str(tmp_path / "gone" / "severity")),
    }
    for name, changes in cases.items():
        run = tmp_path / name
        write_feature_run(run, protocol_dir)
        configure(run, **changes)
        with pytest.raises(ValueError, match=f"{run} was trained on fold {changes['fold']} of .*severity"):
            rf.evaluate_run_features(protocol_dir, [(run, "penultimate")], num_splits=1)
    capsys.readouterr()
    assert rf.main(["--tfrecords", str(protocol_dir), "--run", str(tmp_path / "same") + ":penultimate"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {tmp_path / 'same'} was trained on fold 2 of {protocol_dir}")
    assert "test halves of other splits" in captured.err and captured.out == ""

    # a classifier trained on another protocol of the same images saw no scores: accepted
    write_feature_run(tmp_path / "cls", protocol_dir)
    run = configure(tmp_path / "cls", protocol="2class", tfrecords=str(tmp_path / "absent" / "2class"))
    _, results = rf.evaluate_run_features(protocol_dir, [(run, None)], num_splits=1)
    assert results[1].name == "cls: tiny (2class fold 1) penultimate [3]"
