"""caaxr_tf.cv with a fake trainer that writes untrained run folders: rows, mean ± std, resuming."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from caaxr_tf import cv
from caaxr_tf.cv import format_mean_std, format_results_table, run_cv

SEG_METRICS = ["dice", "iou", "num_images", "dice_consolidation", "iou_consolidation", "num_images_consolidation"]


@pytest.fixture(scope="module")
def tfrecords(tiny_data_root, tmp_path_factory) -> Path:
    from caaxr_tf.data.tfrecords import build_tfrecords

    out = tmp_path_factory.mktemp("cv_tfrecords")
    build_tfrecords(tiny_data_root, out, protocols=["seg", "3class"], workers=1, progress=False, log=lambda _: None)
    return out


def tiny_model(task: str, num_classes: int, seed: int) -> keras.Model:
    """A small untrained model whose outputs depend on the image and on ``seed``."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((224, 224, 1))
    x = layers.Rescaling(1 / 255.0)(inputs)
    if task == "segmentation":
        x = layers.Conv2D(4, 5, padding="same", activation="relu")(x)
        outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid", bias_initializer=keras.initializers.Constant(-0.3))(x)
    else:
        x = layers.Conv2D(8, 5, strides=4, activation="relu")(layers.AveragePooling2D(2)(x))
        x = layers.GlobalAveragePooling2D()(x)
        outputs = layers.Dense(num_classes, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(stddev=3.0))(x)
    return keras.Model(inputs, outputs)


class FakeTrainer:
    """Stands in for caaxr_tf.train.run_training: writes config.yaml, best.keras and final.keras."""

    def __init__(self, fail: set[tuple[str, int]] = frozenset()):
        self.calls: list = []  # (RunConfig, run_dir) of every call
        self.fail = set(fail)

    def __call__(self, config, run_dir: Path) -> None:
        self.calls.append((config, Path(run_dir)))
        if (config.model, config.fold) in self.fail:
            raise RuntimeError("training failed")
        summary = json.loads((Path(config.tfrecords) / "summary.json").read_text())
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        seed = 10 * config.fold + len(config.model)
        model = tiny_model(summary["task"], len(summary["classes"]), seed)
        model.save(run_dir / "best.keras")
        shutil.copy(run_dir / "best.keras", run_dir / "final.keras")
        mapping = {**config.to_mapping(), "seed": seed}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(mapping), encoding="utf-8")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def metrics_of(run_dir: Path, name: str = "metrics.json") -> dict:
    return json.loads((run_dir / "eval" / name).read_text())


def check_aggregates(rows: list[dict[str, str]], model: str, columns: list[str], folds: list[int]) -> None:
    """The model's mean/std rows against numpy over its fold rows."""
    fold_rows = [r for r in rows if r["model"] == model and r["fold"] not in ("mean", "std") and r["status"] == "ok"]
    assert sorted(int(r["fold"]) for r in fold_rows) == folds
    mean_row = next(r for r in rows if r["model"] == model and r["fold"] == "mean")
    std_row = next(r for r in rows if r["model"] == model and r["fold"] == "std")
    for column in columns:
        values = np.array([float(r[column]) for r in fold_rows])
        assert float(mean_row[column]) == pytest.approx(values.mean(), rel=1e-8, abs=1e-10)
        if len(values) > 1:
            assert float(std_row[column]) == pytest.approx(values.std(ddof=1), rel=1e-7, abs=1e-10)
        else:
            assert std_row[column] == ""


@pytest.fixture(scope="module")
def seg_cv(tfrecords, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv_seg")
    trainer = FakeTrainer()
    log: list[str] = []
    rows = run_cv("seg", ["unet", "segnet"], tfrecords, out,
                  training=cv.TrainingOptions(flags={"epochs": 1}, overrides=["model_kwargs.base_filters=4"]),
                  plots=False, trainer=trainer, log=log.append)
    return out, trainer, rows, log


def test_cv_segmentation_rows_and_mean_std(seg_cv, tfrecords):
    out, trainer, rows, log = seg_cv
    assert [(config.model, config.fold) for config, _ in trainer.calls] == [
        ("unet", 1), ("unet", 2), ("segnet", 1), ("segnet", 2)]
    config, run_dir = trainer.calls[0]
    assert run_dir == out / "unet" / "fold1"
    assert (config.protocol, config.tfrecords, config.epochs, config.model_kwargs) == (
        "seg", str(tfrecords / "seg"), 1, {"base_filters": 4})
    assert all(r["status"] == "ok" for r in rows)

    table = read_csv(out / "results.csv")
    assert [(r["model"], r["fold"]) for r in table] == [
        ("unet", "1"), ("unet", "2"), ("unet", "mean"), ("unet", "std"),
        ("segnet", "1"), ("segnet", "2"), ("segnet", "mean"), ("segnet", "std")]
    summary = json.loads((tfrecords / "seg" / "summary.json").read_text())
    for r in table[:2] + table[4:6]:
        run_dir = out / r["model"] / f"fold{r['fold']}"
        full, subset = metrics_of(run_dir), metrics_of(run_dir, "metrics_test_consolidation.json")
        assert float(r["dice"]) == pytest.approx(full["dice"], rel=1e-9)
        assert float(r["iou"]) == pytest.approx(full["iou"], rel=1e-9)
        assert float(r["dice_consolidation"]) == pytest.approx(subset["dice"], rel=1e-9)
        assert int(r["num_images_consolidation"]) == summary["counts"]["subset_consolidation"]["test"]
        assert int(r["num_images"]) == summary["counts"]["test"]["lesion"]
    assert float(table[0]["dice"]) != float(table[1]["dice"]), "folds should differ for a meaningful std"
    for model in ("unet", "segnet"):
        check_aggregates(table, model, SEG_METRICS, [1, 2])

    markdown = (out / "results.md").read_text()
    assert "| model | folds | DICE | IoU | DICE (consolidation subset) |" in markdown
    for model in ("unet", "segnet"):
        fold_rows = [r for r in table if r["model"] == model and r["fold"] in ("1", "2")]
        cells = [format_mean_std(np.mean(v), np.std(v, ddof=1))
                 for v in ([float(r[c]) for r in fold_rows] for c in ("dice", "iou", "dice_consolidation"))]
        assert f"| {model} | 2 | {' | '.join(cells)} |" in markdown
    assert any("DICE" in line for line in log)  # the plain-text summary table was printed


def test_cv_segmentation_baselines_against_numpy(seg_cv, tfrecords):
    """Empty and all-ones predictions, scored from the test masks read back independently."""
    out, _, _, log = seg_cv
    baselines = json.loads((out / "baselines.json").read_text())
    masks, subset_flags = [], []
    manifest = {r["image_id"]: r for r in read_csv(tfrecords / "seg" / "manifest.csv")}
    from caaxr_tf.tasks.datasets import make_dataset

    for _, mask, ids in make_dataset(tfrecords / "seg", "test", task="segmentation", training=False, augment=False,
                                     cache=False, batch_size=8, with_ids=True):
        masks.extend(m[..., 0] > 0.5 for m in mask.numpy())
        subset_flags.extend(manifest[i.decode()]["subset_consolidation"] == "1" for i in ids.numpy())
    area = np.array([m.sum() for m in masks], float)
    total = masks[0].size
    expected_ones = {"dice": 2 * area / (area + total), "iou": area / total}
    expected_empty = {"dice": np.where(area == 0, 1.0, 0.0), "iou": np.where(area == 0, 1.0, 0.0)}
    flags = np.array(subset_flags)
    for key, chosen in (("", np.ones(len(masks), bool)), ("consolidation", flags)):
        assert baselines[key]["all-ones mask"]["num_images"] == chosen.sum()
        for metric in ("dice", "iou"):
            assert baselines[key]["all-ones mask"][metric] == pytest.approx(expected_ones[metric][chosen].mean(), rel=1e-6)
            assert baselines[key]["empty mask"][metric] == pytest.approx(expected_empty[metric][chosen].mean(), abs=1e-9)
    markdown = (out / "results.md").read_text()
    ones = baselines[""]["all-ones mask"]
    assert f"| all-ones mask | {ones['dice']:.3f} | {ones['iou']:.3f} |" in markdown
    assert any("constant predictions" in line for line in log)


def test_cv_resumes_and_force(seg_cv, tfrecords):
    out, _, _, _ = seg_cv
    before = (out / "results.csv").read_text()

    again = FakeTrainer()
    run_cv("seg", ["unet", "segnet"], tfrecords, out, plots=False, trainer=again, log=lambda _: None)
    assert again.calls == []
    assert (out / "results.csv").read_text() == before

    # A run killed during evaluation (subset metrics missing) is trained (resumed) and evaluated again.
    (out / "segnet" / "fold2" / "eval" / "metrics_test_consolidation.json").unlink()
    resumed = FakeTrainer()
    run_cv("seg", ["unet", "segnet"], tfrecords, out, plots=False, trainer=resumed, log=lambda _: None)
    assert [(config.model, config.fold) for config, _ in resumed.calls] == [("segnet", 2)]
    assert (out / "results.csv").read_text() == before

    forced = FakeTrainer()
    run_cv("seg", ["unet"], tfrecords, out, folds=[2], force=True, plots=False, trainer=forced, log=lambda _: None)
    assert len(forced.calls) == 1
    assert [(r["model"], r["fold"]) for r in read_csv(out / "results.csv")] == [
        ("unet", "2"), ("unet", "mean"), ("unet", "std")]


def test_cv_classification_with_a_failed_fold(tfrecords, tmp_path, capsys):
    trainer = FakeTrainer(fail={("mobilenetv2", 2)})
    code = cv.main(["--protocol", "3class", "--models", "resnet18,mobilenetv2", "--tfrecords", str(tfrecords),
                    "--out", str(tmp_path), "--epochs", "3", "--lr", "0.01", "--no-plots"], trainer=trainer)
    assert code == 1
    assert (trainer.calls[0][0].epochs, trainer.calls[0][0].optimizer.learning_rate) == (3, 0.01)
    names = json.loads((tfrecords / "3class" / "summary.json").read_text())["classes"]
    columns = [f"auc_{n}" for n in names] + [
        "auc_macro", "sensitivity_at_99_specificity", "sensitivity_at_90_specificity", "accuracy", "num_images"]

    table = read_csv(tmp_path / "results.csv")
    failed = next(r for r in table if r["model"] == "mobilenetv2" and r["fold"] == "2")
    assert failed["status"].startswith("failed: training raised RuntimeError: training failed")
    for r in table:
        if r["fold"] in ("1", "2") and r["status"] == "ok":
            metrics = metrics_of(tmp_path / r["model"] / f"fold{r['fold']}")
            assert float(r["accuracy"]) == pytest.approx(metrics["accuracy"], rel=1e-9)
            assert float(r["sensitivity_at_99_specificity"]) == pytest.approx(metrics["sensitivity_at_99_specificity"])
            for n in names:
                assert float(r[f"auc_{n}"]) == pytest.approx(metrics["auc_per_class"][n], rel=1e-9)
    check_aggregates(table, "resnet18", columns, [1, 2])
    check_aggregates(table, "mobilenetv2", columns, [1])
    assert next(r for r in table if r["model"] == "mobilenetv2" and r["fold"] == "mean")["status"] == "1 of 2 folds"

    markdown = (tmp_path / "results.md").read_text()
    assert ("| model | folds | AUC covid | AUC non_covid_unhealthy | AUC healthy | Sens. @ 99% spec. (covid) | "
            "Sens. @ 90% spec. (covid) | Accuracy |") in markdown
    one = next(r for r in table if r["model"] == "mobilenetv2" and r["fold"] == "1")
    assert f"| mobilenetv2 | 1 of 2 | {float(one['auc_covid']):.3f} |" in markdown
    assert "* mobilenetv2 fold 2: failed: training raised RuntimeError: training failed" in markdown
    assert "FAILED" in capsys.readouterr().out
    # --bootstrap (default 2000): the interval of the mean over folds, around the mean row
    intervals = json.loads((tmp_path / "intervals.json").read_text())
    assert intervals["resnet18"]["folds"] == [1, 2] and intervals["mobilenetv2"]["folds"] == [1]
    mean_row = next(r for r in table if r["model"] == "resnet18" and r["fold"] == "mean")
    for key, column in (("auc_macro", "auc_macro"), ("accuracy", "accuracy"), ("auc_per_class/covid", "auc_covid")):
        cell = intervals["resnet18"]["intervals"][key]
        # predictions.csv holds 6 decimals: ranks tie only where scores agree to 1e-6
        assert cell["estimate"] == pytest.approx(float(mean_row[column]), abs=1e-4), key
        assert cell["low"] <= cell["estimate"] <= cell["high"] and cell["n_resamples"] == 2000
    assert "resnet18, mean over folds 1, 2 with its 95 % interval" in markdown


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "unet", "--protocol", "3class"], "is a segmentation model"),
        (["--models", "nonet", "--protocol", "seg"], "unknown model 'nonet'"),
        (["--models", "unet", "--protocol", "seg", "--folds", "1,3"], "fold 3 does not exist"),
        (["--models", "unet", "--protocol", "2class"], "2class/summary.json not found"),
    ],
)
def test_cv_argument_errors_are_one_line(tfrecords, tmp_path, capsys, argv, message):
    trainer = FakeTrainer()
    assert cv.main([*argv, "--tfrecords", str(tfrecords), "--out", str(tmp_path / "cv")], trainer=trainer) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert trainer.calls == []


def test_format_results_table_and_csv_aggregates():
    rows = [
        {"model": "a", "fold": 1, "status": "ok", "dice": 0.9, "iou": 0.8},
        {"model": "a", "fold": 2, "status": "ok", "dice": 0.8, "iou": None},
        {"model": "b", "fold": 1, "status": "ok", "dice": 0.5, "iou": 0.25},
        {"model": "b", "fold": 2, "status": "failed: boom"},
    ]
    columns = [("dice", "DICE"), ("iou", "IoU")]
    assert format_results_table(rows, columns).splitlines() == [
        "| model | folds | DICE | IoU |",
        "|---|---|---:|---:|",
        f"| a | 2 | 0.850 ± {np.std([0.9, 0.8], ddof=1):.3f} | 0.800 |",
        "| b | 1 of 2 | 0.500 | 0.250 |",
    ]
    text = format_results_table(rows, columns, markdown=False).splitlines()
    assert text[0].split() == ["model", "folds", "DICE", "IoU"] and text[2].startswith("a ")
    table = list(csv.DictReader(cv.results_csv_text(rows, ["dice", "iou"]).splitlines()))
    assert [(r["model"], r["fold"], r["status"]) for r in table if r["fold"] in ("mean", "std")] == [
        ("a", "mean", "2 of 2 folds"), ("a", "std", "2 of 2 folds"), ("b", "mean", "1 of 2 folds"), ("b", "std", "1 of 2 folds")]
    assert float(table[2]["dice"]) == pytest.approx(0.85) and float(table[3]["dice"]) == pytest.approx(0.0707106781)
    assert table[3]["iou"] == ""  # one value: no standard deviation


def test_training_flags_resolve_as_train_resolves_them(tfrecords):
    """cv takes train's flags and resolves every run's configuration the way train does."""
    from caaxr_tf.train import parse_args as train_parse_args
    from caaxr_tf.train import resolve_config

    flags = ["--epochs", "2", "--steps-per-epoch", "5", "--batch-size", "4", "--lr", "0.001", "--weights", "none",
             "--strategy", "mirrored", "--mixed-precision", "--jit", "--set", "seed=3", "--set", "model_kwargs.depth=2"]
    args = cv.parse_args(["--protocol", "seg", "--models", "unet", "--tfrecords", str(tfrecords), "--out", "o", *flags])
    options = cv.training_options(args)
    assert options.flags["epochs"] == 2 and options.flags["learning_rate"] == 0.001
    assert options.overrides == ["seed=3", "model_kwargs.depth=2"]
    from caaxr_tf.training import resolve_run_config

    via_cv = resolve_run_config(tfrecords, "seg", "unet", 1, config_file=options.config_file, flags=options.flags,
                                overrides=options.overrides)
    via_train = resolve_config(train_parse_args(
        ["--protocol", "seg", "--model", "unet", "--tfrecords", str(tfrecords), "--out", "o", *flags]))
    assert via_cv == via_train
    assert (via_cv.epochs, via_cv.optimizer.learning_rate, via_cv.strategy, via_cv.mixed_precision, via_cv.seed,
            via_cv.model_kwargs) == (2, 0.001, "mirrored", True, 3, {"depth": 2})


def test_an_unknown_setting_stops_the_cv_before_anything_runs(tfrecords, tmp_path, capsys):
    trainer = FakeTrainer()
    code = cv.main(["--protocol", "seg", "--models", "unet", "--tfrecords", str(tfrecords), "--out", str(tmp_path / "cv"),
                    "--set", "epocs=3"], trainer=trainer)
    assert code == 2 and trainer.calls == []
    err = capsys.readouterr().err
    assert "unknown key 'epocs' (did you mean 'epochs'?); valid keys:" in err
    assert not (tmp_path / "cv").exists()
