"""Issue 27 on the training side: target settings checked by name (A), a failed start leaves
nothing that blocks the corrected command (A), a run folder refuses other records (B, defect 9),
loss options typed and checked (C, defect 13) and models.<name> sections of train.yaml and a
--config file checked, naming the file (D, defect 14). Nothing here trains a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from caaxr_tf import runs
from caaxr_tf import train as train_lib
from caaxr_tf.data import tfrecords as tfr
from test_severity_halves import write_scored_collection

SMALL = ["--set", "image_size=32", "--set", "model_kwargs.base_filters=2", "--quiet"]


@pytest.fixture(scope="module")
def seg_records(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability_config")
    tfr.build_tfrecords(tiny_data_root, out, protocols="seg", storage_size=64, records_per_shard=4, workers=1,
                        progress=False, log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def severity_records(tmp_path_factory) -> Path:
    root = write_scored_collection(tmp_path_factory.mktemp("scored"))
    out = tmp_path_factory.mktemp("severity_records")
    tfr.build_tfrecords(root, out, source="covid-chestxray", protocols=["severity"], folds=2, workers=1,
                        records_per_shard=5, progress=False, log=lambda line: None)
    return out


def seg_argv(records: Path, out: Path, *extra: str) -> list[str]:
    return ["--protocol", "seg", "--model", "unet", "--tfrecords", str(records), "--out", str(out),
            "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", *SMALL, *extra]


def severity_argv(records: Path, out: Path, *extra: str) -> list[str]:
    return ["--protocol", "severity", "--model", "mobilenetv2_regressor", "--tfrecords", str(records),
            "--out", str(out), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
            "--set", "image_size=32", "--quiet", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --------------------------------------------------------------------------- A


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "target_names=[a]"],
         "error: target_names ['a'] does not match the records: "),
        (["--set", "target_names=[opacity, geographic_extent]"], "holds targets ['geographic_extent', 'opacity']"),
        (["--set", "target_ranges.opacity=[6.0, 0.0]"],
         "error: target_ranges.opacity: expected finite low < high, got [6.0, 0.0]"),
        (["--set", "target_ranges.opacity=[.nan, 6.0]"], "error: target_ranges.opacity: expected finite low < high"),
        (["--set", "target_ranges.opacity=[0.0, .inf]"], "error: target_ranges.opacity: expected finite low < high"),
        (["--set", "target_ranges.opacity=[0.0]"], "error: target_ranges.opacity: expected [low, high], got [0.0]"),
        (["--set", "target_ranges.opacty=[0.0, 6.0]"],
         "error: target_ranges.opacty: not one of the protocol's targets ['geographic_extent', 'opacity']"),
    ],
)
def test_bad_target_settings_are_errors_naming_the_setting(severity_records, tmp_path, capsys, extra, message):
    run_dir = tmp_path / "run"
    assert train_lib.main(severity_argv(severity_records, run_dir, *extra)) == 2
    assert message in one_error_line(capsys)
    assert not run_dir.exists()


def test_target_ranges_inside_the_targets_are_accepted(severity_records, tmp_path):
    args = train_lib.parse_args(severity_argv(severity_records, tmp_path / "r", "--set",
                                              "target_ranges.opacity=[0, 5.5]"))
    config = train_lib.resolve_config(args)
    assert config.target_ranges == {"geographic_extent": [0.0, 8.0], "opacity": [0, 5.5]}
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_start_failing_when_the_model_is_built_leaves_nothing_that_blocks_the_rerun(
        seg_records, tmp_path, capsys, existing):
    """A setting found unusable only when the model is built: the failed first start removes
    what it wrote, so the corrected command is not refused as "a run with other settings"."""
    run_dir = tmp_path / "run"
    if existing:  # an --out made beforehand keeps what it held, and stays
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("mine")
    assert train_lib.main(seg_argv(seg_records, run_dir, "--set", "model_kwargs.base_filterz=4")) == 2
    assert "base_filterz" in one_error_line(capsys)
    if existing:
        assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    else:
        assert not run_dir.exists()
    corrected = train_lib.resolve_config(train_lib.parse_args(seg_argv(seg_records, run_dir)))
    assert train_lib.prepare_run_dir(run_dir, corrected, True) is False  # not refused
    assert (run_dir / runs.CONFIG_FILE).exists()
