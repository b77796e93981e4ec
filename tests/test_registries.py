"""The task registry, strict configuration, and the errors they give every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import pytest
import yaml

from caaxr_tf import cv, evaluate, export, train
from caaxr_tf.config import ConfigError, from_mapping
from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.tasks import UnknownTaskError, available_tasks, get_task, task_for
from caaxr_tf.training.config import OptimizerConfig, RunConfig


@pytest.fixture(scope="module")
def seg_records(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("registry_tfrecords")
    tfr.build_tfrecords(tiny_data_root, out, protocols=["seg"], workers=1, progress=False, log=lambda line: None)
    return out


@pytest.fixture
def unknown_task_records(seg_records, tmp_path) -> Path:
    """A copy of the seg protocol whose summary.json names a task nobody registered."""
    root = tmp_path / "records"
    shutil.copytree(seg_records / "seg", root / "seg")
    summary_path = root / "seg" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["task"] = "telepathy"
    summary_path.write_text(json.dumps(summary))
    return root


def test_the_builtin_tasks_and_how_a_run_finds_its_task():
    assert {"classification", "ct", "segmentation", "detection", "regression"} <= set(available_tasks())
    assert task_for("segmentation", "detection") is get_task("detection")
    assert task_for("segmentation", "segmentation") is get_task("segmentation")
    with pytest.raises(UnknownTaskError, match="a classification model cannot run on a segmentation protocol"):
        task_for("segmentation", "classification")
    with pytest.raises(UnknownTaskError, match="unknown task 'telepathy'; known tasks: classification, ct, detection"):
        get_task("telepathy")


def test_an_unknown_task_in_summary_json_is_a_clear_error_everywhere(unknown_task_records, tmp_path, capsys):
    message = "unknown protocol task 'telepathy'; known tasks: classification, ct, detection"
    argv = ["--protocol", "seg", "--model", "unet", "--tfrecords", str(unknown_task_records),
            "--out", str(tmp_path / "run")]
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err

    assert cv.main(["--protocol", "seg", "--models", "unet", "--tfrecords", str(unknown_task_records),
                    "--out", str(tmp_path / "cv")]) == 2
    assert "unknown task 'telepathy'; known tasks:" in capsys.readouterr().err

    # a run folder of that protocol (as an older or foreign version would have written it)
    run_dir = tmp_path / "foreign_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"task": "telepathy", "model": "unet", "protocol": "seg", "fold": 1, "image_size": 32, "batch_size": 2,
         "class_names": ["lesion"], "tfrecords": str(unknown_task_records / "seg")}))
    inputs = keras.Input((32, 32, 1))
    keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs)).save(run_dir / "best.keras")
    assert evaluate.main(["--run", str(run_dir)]) == 2
    assert "unknown task 'telepathy'; known tasks:" in capsys.readouterr().err
    assert export.main(["--run", str(run_dir), "--out", str(tmp_path / "saved_models" / "x")]) == 2
    assert "unknown task 'telepathy'; known tasks:" in capsys.readouterr().err
    assert not (tmp_path / "saved_models" / "x" / "1").exists() and not (run_dir / "eval").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "epocs=3"], "unknown key 'epocs' (did you mean 'epochs'?); valid keys: augment, augment_in, batch_size, bn_recompute_images"),
        (["--set", "optimizer.lerning_rate=0.1"],
         "unknown key 'lerning_rate' in optimizer (did you mean 'learning_rate'?); valid keys: beta_1, beta_2"),
        (["--set", "loss=dice"], "unknown loss 'dice' for the segmentation task; expected one of binary_crossentropy, bce_dice"),
        (["--set", "strategy=cluster"], "strategy must be one of auto, one, mirrored, multiworker, got 'cluster'"),
        (["--set", "cache=yes please"], "cache must be true or false, got 'yes please'"),
        (["--set", "optimizer={name: adam, learning_rate: 0.001, momentum: 0.9}"], None),  # checked when built
    ],
)
def test_an_unknown_or_mistyped_config_key_names_the_valid_ones(seg_records, tmp_path, capsys, extra, message):
    argv = ["--protocol", "seg", "--model", "unet", "--tfrecords", str(seg_records), "--out", str(tmp_path / "r"), *extra]
    if message is None:
        config = train.resolve_config(train.parse_args(argv))
        with pytest.raises(ConfigError, match="optimizer adam: .*momentum"):
            config.optimizer.build()
        return
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_a_config_file_with_a_typo_is_refused(seg_records, tmp_path, capsys):
    config_file = tmp_path / "short.yaml"
    config_file.write_text("segmentation: {epochs: 2, batchsize: 4}\n")
    argv = ["--protocol", "seg", "--model", "unet", "--tfrecords", str(seg_records), "--out", str(tmp_path / "r"),
            "--config", str(config_file)]
    assert train.main(argv) == 2
    # the whole file is checked section by section: the error names the file and the section
    assert (f"--config: {config_file}: unknown key 'batchsize' in segmentation (did you mean 'batch_size'?)"
            in capsys.readouterr().err)


def test_run_config_round_trips_through_its_yaml(seg_records, tmp_path):
    args = train.parse_args(["--protocol", "seg", "--model", "unet", "--tfrecords", str(seg_records), "--out",
                             str(tmp_path / "r"), "--lr", "0.003", "--set", "model_kwargs.base_filters=4"])
    config = train.resolve_config(args)
    assert isinstance(config, RunConfig) and config.optimizer == OptimizerConfig("adam", 0.003)
    again = from_mapping(RunConfig, yaml.safe_load(yaml.safe_dump(config.to_mapping())))
    assert again == config
