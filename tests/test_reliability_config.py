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


# --------------------------------------------------------------------------- B (defect 9)


def records_copy(records: Path, into: Path, fingerprint: str | None = None) -> Path:
    """A copy of the records folder; ``fingerprint``: as if rebuilt from other data."""
    shutil.copytree(records, into)
    if fingerprint is not None:
        summary_path = into / "seg" / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary["fingerprint"] = fingerprint
        summary_path.write_text(json.dumps(summary))
    return into


def started_run(records: Path, run_dir: Path, finished: bool) -> str:
    """A run folder as a first start leaves it: killed after epoch 1, or finished (1 epoch)."""
    config = train_lib.resolve_config(train_lib.parse_args(seg_argv(records, run_dir)))
    assert train_lib.prepare_run_dir(run_dir, config, True) is False
    (run_dir / runs.HISTORY_FILE).write_text("epoch,loss\n1,0.5\n")
    if finished:
        (run_dir / runs.FINAL_MODEL).write_bytes(b"")
    return (run_dir / runs.CONFIG_FILE).read_text()


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_folder_refuses_other_records_and_accepts_the_same_records_moved(
        seg_records, tmp_path, capsys, finished):
    run_dir = tmp_path / "run"
    saved = started_run(seg_records, run_dir, finished)
    other = records_copy(seg_records, tmp_path / "other", fingerprint="0" * 64)
    assert train_lib.main(seg_argv(other, run_dir)) == 2  # resumed / "nothing to do" before
    error = one_error_line(capsys)
    assert f"error: {run_dir} holds a run with other settings (tfrecords {seg_records / 'seg'} -> {other / 'seg'}" \
           in error and "other records: summary.json fingerprint" in error and "-> 000000000000" in error, error
    assert (run_dir / runs.CONFIG_FILE).read_text() == saved  # not rewritten
    # with another setting too: both named; the check kept for settings is unchanged
    assert train_lib.main(seg_argv(other, run_dir, "--batch-size", "4")) == 2
    assert "fingerprint" in one_error_line(capsys)
    assert train_lib.main(seg_argv(seg_records, run_dir, "--batch-size", "4")) == 2
    assert f"error: {run_dir} holds a run with other settings (batch_size); use another --out" in one_error_line(capsys)

    # the same records in another folder (summary fingerprint equal): the run goes on there
    moved = records_copy(seg_records, tmp_path / "moved")
    if finished:
        assert train_lib.main(seg_argv(moved, run_dir)) == 0
        assert "nothing to do" in capsys.readouterr().out
    else:
        config = train_lib.resolve_config(train_lib.parse_args(seg_argv(moved, run_dir)))
        assert train_lib.prepare_run_dir(run_dir, config, True) is False
        assert f"tfrecords: {moved / 'seg'}" in (run_dir / runs.CONFIG_FILE).read_text()


def test_records_rebuilt_in_place_or_of_an_older_run_folder_are_compared_by_path(seg_records, tmp_path, capsys):
    records = records_copy(seg_records, tmp_path / "records")
    run_dir = tmp_path / "run"
    started_run(records, run_dir, finished=False)
    # rebuilt with other data at the same path: refused although the path is the same
    rebuilt = json.loads((records / "seg" / "summary.json").read_text())
    original = rebuilt["fingerprint"]
    rebuilt["fingerprint"] = "f" * 64
    (records / "seg" / "summary.json").write_text(json.dumps(rebuilt))
    assert train_lib.main(seg_argv(records, run_dir)) == 2
    assert "other records: summary.json fingerprint" in one_error_line(capsys)
    rebuilt["fingerprint"] = original
    (records / "seg" / "summary.json").write_text(json.dumps(rebuilt))

    # a config.yaml written before fingerprints were kept: the same path is the same run, another is refused
    import yaml

    old = yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text())
    del old["records_fingerprint"]
    (run_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(old))
    config = train_lib.resolve_config(train_lib.parse_args(seg_argv(records, run_dir)))
    assert train_lib.prepare_run_dir(run_dir, config, True) is False
    (run_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(old))
    assert train_lib.main(seg_argv(records_copy(seg_records, tmp_path / "moved"), run_dir)) == 2
    assert "no records fingerprint in" in one_error_line(capsys)


# --------------------------------------------------------------------------- C (defect 13)


def resolve(argv: list[str]):
    return train_lib.resolve_config(train_lib.parse_args(argv))


def loss_settings(loss: str, options: list[str]) -> list[str]:
    return ["--set", f"loss={loss}", *(item for option in options for item in ("--set", f"loss_kwargs.{option}"))]


@pytest.mark.parametrize(
    "loss, options",
    [
        ("focal_dice", ["alpha=0"]), ("focal_dice", ["alpha=1"]), ("focal_dice", ["alpha=0.5", "gamma=0"]),
        ("focal_dice", ["focal_weight=0"]), ("focal_dice", ["dice_weight=0", "focal_weight=2.5"]),
        ("focal_dice", ["apply_class_balancing=false", "smooth=1.0e-6"]), ("focal_dice", []),
        ("bce_dice", []), ("binary_crossentropy", []),
    ],
)
def test_loss_options_at_their_boundaries_are_accepted(seg_records, tmp_path, loss, options):
    config = resolve(seg_argv(seg_records, tmp_path / "r", *loss_settings(loss, options)))
    assert config.loss == loss and set(config.loss_kwargs) == {o.split("=")[0] for o in options}


@pytest.mark.parametrize(
    "loss, options, message",
    [
        ("focal_dice", ["alpha=5"], "loss focal_dice: loss_kwargs.alpha must be a finite number >= 0 and <= 1, got 5"),
        ("focal_dice", ["alpha=1.01"], "loss_kwargs.alpha must be a finite number >= 0 and <= 1, got 1.01"),
        ("focal_dice", ["alpha=-0.01"], "loss_kwargs.alpha must be a finite number >= 0 and <= 1, got -0.01"),
        ("focal_dice", ["alpha=.nan"], "loss_kwargs.alpha must be a finite number >= 0 and <= 1, got nan"),
        ("focal_dice", ["gamma=-0.5"], "loss_kwargs.gamma must be a finite number >= 0, got -0.5"),
        ("focal_dice", ["smooth=0"], "loss_kwargs.smooth must be a finite number > 0, got 0"),
        ("focal_dice", ["dice_weight=-1"], "loss_kwargs.dice_weight must be a finite number >= 0, got -1"),
        ("focal_dice", ["focal_weight=0", "dice_weight=0"], "focal_weight and dice_weight cannot both be 0"),
        ("focal_dice", ["apply_class_balancing=maybe"],
         "loss_kwargs.apply_class_balancing must be true or false, got 'maybe'"),
        ("focal_dice", ["alpah=0.3"],
         "loss focal_dice: unknown key 'alpah' in loss_kwargs (did you mean 'alpha'?); "
         "valid keys: alpha, apply_class_balancing, dice_weight, focal_weight, gamma, smooth"),
        ("binary_crossentropy", ["alpha=0.3"], "loss binary_crossentropy takes no loss_kwargs, got alpha"),
        ("bce_dice", ["smooth=2.0"], "loss bce_dice takes no loss_kwargs, got smooth (of this task's losses, "
                                     "focal_dice takes alpha, apply_class_balancing"),
    ],
)
def test_bad_segmentation_loss_options_are_errors_naming_key_value_and_range(seg_records, tmp_path, loss, options,
                                                                             message):
    with pytest.raises(train_lib.ConfigError) as error:
        resolve(seg_argv(seg_records, tmp_path / "r", *loss_settings(loss, options)))
    assert message in str(error.value)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "loss, options, message",
    [
        ("huber", ["delta=-2"], "loss huber: loss_kwargs.delta must be a finite number > 0, got -2"),
        ("huber", ["delta=0"], "loss_kwargs.delta must be a finite number > 0, got 0"),
        ("huber", ["delt=1.0"], "unknown key 'delt' in loss_kwargs (did you mean 'delta'?); valid keys: delta"),
        ("mse", ["delta=2.0"], "loss mse takes no loss_kwargs, got delta (of this task's losses, huber takes delta)"),
        ("mae", ["reduction=sum"], "loss mae takes no loss_kwargs, got reduction"),
        (None, [], None),  # huber at the boundary: accepted
    ],
)
def test_regression_loss_options_are_checked(severity_records, tmp_path, loss, options, message):
    argv = severity_argv(severity_records, tmp_path / "r")
    if message is None:
        assert resolve(argv + loss_settings("huber", ["delta=1.0e-6"])).loss_kwargs == {"delta": 1.0e-6}
        return
    with pytest.raises(train_lib.ConfigError) as error:
        resolve(argv + loss_settings(loss, options))
    assert message in str(error.value)


def test_a_negative_huber_delta_is_refused_before_the_run_folder_is_written(severity_records, tmp_path, capsys):
    run_dir = tmp_path / "run"  # it trained at loss -5.2, saved as best
    assert train_lib.main(severity_argv(severity_records, run_dir, *loss_settings("huber", ["delta=-2"]))) == 2
    assert "error: loss huber: loss_kwargs.delta must be a finite number > 0, got -2" in one_error_line(capsys)
    assert not run_dir.exists()


# --------------------------------------------------------------------------- D (defect 14)


@pytest.mark.parametrize(
    "text, model, message",
    [
        ("models:\n  unett: {batch_size: 2}\n", "unet",
         "unknown model 'unett' in models (did you mean 'unet'?); valid models: "),
        ("models:\n  unet: {batch_sise: 2}\n", "segnet",  # another model's section: never merged, still checked
         "unknown key 'batch_sise' in models.unet (did you mean 'batch_size'?); valid keys: "),
        ("models:\n  segnet: {epochs: 0}\n", "unet", "models.segnet.epochs must be an integer >= 1, got 0"),
        ("models:\n  unet: {optimizer: {learning_rate: 1e-3}}\n", "unet",
         "learning rate must be a finite number > 0, got '1e-3'"),
        ("models: [unet]\n", "unet", "models must be a mapping of model names to settings, got ['unet']"),
        ("segmentation: {epocs: 3}\n", "unet",
         "unknown key 'epocs' in segmentation (did you mean 'epochs'?); valid keys: "),
        ("segmentaton: {epochs: 3}\n", "unet", "unknown key 'segmentaton' (did you mean 'segmentation'?)"),
        ("models:\n  unet:\n    model_kwargs: {base_filters: 2}\n  maskrcnn: {batch_size: 2}\n"
         "  unet_plus: {epochs: 1}\n", "unet", "unknown model 'unet_plus' in models"),
    ],
)
def test_a_config_file_is_checked_whole_and_its_errors_name_it(seg_records, tmp_path, capsys, text, model, message):
    config_file = tmp_path / "settings.yaml"
    config_file.write_text(text)
    run_dir = tmp_path / "run"
    argv = seg_argv(seg_records, run_dir, "--config", str(config_file))
    argv[argv.index("--model") + 1] = model
    assert train_lib.main(argv) == 2
    error = one_error_line(capsys)
    assert error.startswith(f"error: --config: {config_file}: ") and message in error, error
    assert not run_dir.exists()


def test_train_yaml_model_sections_are_checked_naming_the_file(seg_records, tmp_path, monkeypatch, capsys):
    from caaxr_tf.config import CONFIG_DIR
    from caaxr_tf.training import config as config_lib

    configs = tmp_path / "configs"
    configs.mkdir()
    train_yaml = configs / "train.yaml"
    shipped = (CONFIG_DIR / "train.yaml").read_text()
    monkeypatch.setattr(config_lib, "CONFIG_DIR", configs)
    train_yaml.write_text(shipped + "  segnett:\n    batch_size: 2\n")  # under models:
    assert train_lib.main(seg_argv(seg_records, tmp_path / "run")) == 2
    error = one_error_line(capsys)
    assert error.startswith(f"error: {train_yaml}: unknown model 'segnett' in models (did you mean 'segnet'?)"), error
    assert "valid models: densenet121, " in error
    train_yaml.write_text(shipped.replace("  seed: 0\n", "  sed: 0\n"))
    assert train_lib.main(seg_argv(seg_records, tmp_path / "run")) == 2
    assert f"error: {train_yaml}: unknown key 'sed' in defaults (did you mean 'seed'?)" in one_error_line(capsys)
    train_yaml.write_text(shipped + "extra: {epochs: 1}\n")
    assert train_lib.main(seg_argv(seg_records, tmp_path / "run")) == 2
    error = one_error_line(capsys)
    assert f"error: {train_yaml}: unknown section 'extra'; valid sections: classification, ct, defaults, " in error
    assert not (tmp_path / "run").exists()


def test_the_shipped_config_files_pass_the_whole_file_check(seg_records, tmp_path):
    from caaxr_tf.config import CONFIG_DIR

    for name in ("seg_cpu_short.yaml", "ct_cpu_short.yaml"):
        config = resolve(seg_argv(seg_records, tmp_path / "r", "--config", str(CONFIG_DIR / name)))
        assert config.model == "unet"
