"""caaxr score of regression targets and segmentation mask folders (issue 23, item 5): the
numbers against independent references, and every bad input reported by id and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from caaxr_tf import cli
from caaxr_tf.scoring import PredictionsError, score_file

TARGETS = ["geographic_extent", "opacity"]


@pytest.fixture()
def severity(tmp_path) -> Path:
    """A hand-made regression protocol: 40 test images of 20 patients with two targets."""
    folder = tmp_path / "tfrecords" / "severity"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"task": "regression", "classes": ["scored"],
                                                     "target_names": TARGETS}))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        rows.append({"image_id": f"img{i:03d}.png", "patient_id": f"p{i // 2:03d}", "source": "covid-chestxray",
                     "label": "scored", "label_index": "0", "split_fold1": "test" if i < 40 else "train",
                     "target_geographic_extent": repr(float(rng.integers(0, 9))),
                     "target_opacity": repr(float(rng.integers(0, 7)))})
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def regression_predictions(protocol: Path, prefix: str = "predicted_") -> tuple[list[dict], np.ndarray, np.ndarray]:
    with open(protocol / "manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split_fold1"] == "test"]
    truth = np.array([[float(r[f"target_{t}"]) for t in TARGETS] for r in rows])
    predicted = truth + np.random.default_rng(1).normal(0, 1.5, truth.shape)
    records = [{"image_id": r["image_id"], **{f"true_{t}": "9" for t in TARGETS},  # ignored
                **{f"{prefix}{t}": f"{v:.6f}" for t, v in zip(TARGETS, p)}} for r, p in zip(rows, predicted)]
    return records, truth, np.round(predicted, 6)


def write_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def test_regression_scores_against_sklearn_and_scipy(severity, tmp_path):
    records, truth, predicted = regression_predictions(severity)
    metrics = score_file(severity, write_csv(tmp_path / "p.csv", records), n_resamples=200, log=None,
                         out=tmp_path / "out", plots=False)
    assert metrics["num_images"] == 40 and metrics["task"] == "regression"
    for j, target in enumerate(TARGETS):
        t, p = truth[:, j], predicted[:, j]
        assert metrics[f"{target}_mae"] == pytest.approx(mean_absolute_error(t, p), rel=1e-12)
        assert metrics[f"{target}_mse"] == pytest.approx(mean_squared_error(t, p), rel=1e-12)
        assert metrics[f"{target}_r2"] == pytest.approx(r2_score(t, p), rel=1e-12)
        assert metrics[f"{target}_pearson_r"] == pytest.approx(pearsonr(t, p)[0], rel=1e-9)
        cell = metrics["intervals"][f"{target}_mae"]
        assert cell["low"] < metrics[f"{target}_mae"] < cell["high"]
    assert metrics["intervals"]["num_patients"] == 20
    # the bare target names work as well
    bare, _, _ = regression_predictions(severity, prefix="")
    again = score_file(severity, write_csv(tmp_path / "bare.csv", bare), n_resamples=0, log=None,
                       out=tmp_path / "out2", plots=False)
    assert again["opacity_mae"] == metrics["opacity_mae"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["geographic_extent_r2"] == pytest.approx(
        metrics["geographic_extent_r2"])


@pytest.mark.parametrize("break_it, expected", [
    (lambda r: [x.pop("predicted_opacity") for x in r], "no column for target(s) opacity"),
    (lambda r: r[3].update(predicted_opacity="nan"), "image img003.png: predicted_opacity: nan (NaN or infinite)"),
    (lambda r: r[4].update(predicted_opacity="high"), "image img004.png: predicted_opacity: not a number ('high')"),
    (lambda r: r.append(dict(r[0])), "duplicated image ids: img000.png"),
    (lambda r: r.append({**r[0], "image_id": "img045.png"}), "1 image ids not in the test split"),
    (lambda r: r.__delitem__(slice(0, 3)), "3 of 40 ids of the split missing (7.5%"),
])
def test_every_bad_regression_file_gives_its_error(severity, tmp_path, break_it, expected):
    records, _, _ = regression_predictions(severity)
    break_it(records)
    with pytest.raises(PredictionsError) as caught:
        score_file(severity, write_csv(tmp_path / "bad.csv", records), n_resamples=0, log=None,
                   out=tmp_path / "out", plots=False)
    assert expected in str(caught.value)
    assert not (tmp_path / "out").exists(), "nothing is written for a refused file"


# --------------------------------------------------------------------------- segmentation


@pytest.fixture(scope="module")
def seg(tiny_data_root, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """The tiny seg protocol and its test masks as the pipeline prepares them (the truth)."""
    from caaxr_tf.data.tfrecords import build_tfrecords
    from caaxr_tf.tasks.datasets import make_dataset

    out = tmp_path_factory.mktemp("score_seg")
    build_tfrecords(tiny_data_root, out, protocols=["seg"], workers=1, progress=False, log=lambda _: None)
    truth = {}
    for _, targets, ids in make_dataset(out / "seg", "test", batch_size=8, training=False, cache=False,
                                        with_ids=True):
        masks = np.asarray(targets["mask"] if isinstance(targets, dict) else targets)
        for raw, mask in zip(ids.numpy(), masks):
            truth[raw.decode()] = mask[:, :, 0] > 0.5
    return out / "seg", truth


def write_masks(folder: Path, truth: dict[str, np.ndarray], perfect: set[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, mask in truth.items():
        pixels = (mask * 255).astype(np.uint8) if image_id in perfect else np.zeros(mask.shape, np.uint8)
        cv2.imwrite(str(folder / f"{Path(image_id).stem}.png"), pixels)
    return folder


def test_segmentation_masks_scored_against_the_protocol_masks(seg, tmp_path):
    protocol, truth = seg
    ids = sorted(truth)
    perfect = set(ids[: len(ids) // 2])
    folder = write_masks(tmp_path / "masks", truth, perfect)
    metrics = score_file(protocol, folder, n_resamples=100, log=None, out=tmp_path / "out", plots=False)
    # a perfect mask scores 1; an empty one 0 where the truth has pixels, 1 where it is empty too
    expected = [1.0 if i in perfect or not truth[i].any() else 0.0 for i in ids]
    assert metrics["num_images"] == len(ids) and 0.0 < np.mean(expected) < 1.0, "both outcomes occur"
    assert metrics["dice"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert [metrics["per_image"][i]["dice"] for i in ids] == expected
    assert metrics["intervals"]["dice"]["low"] <= metrics["dice"] <= metrics["intervals"]["dice"]["high"]
    assert cli.main(["score", "--protocol", str(protocol), "--predictions", str(folder), "--bootstrap", "0",
                     "--out", str(tmp_path / "cli")]) == 0


def test_bad_mask_folders_are_reported_by_id_and_field(seg, tmp_path):
    protocol, truth = seg
    ids = sorted(truth)
    folder = write_masks(tmp_path / "masks", truth, set(ids))
    cv2.imwrite(str(folder / f"{Path(ids[0]).stem}.png"), np.zeros((100, 224), np.uint8))
    cv2.imwrite(str(folder / f"{Path(ids[1]).stem}.png"), np.zeros((224, 224, 3), np.uint8))
    (folder / f"{Path(ids[2]).stem}.png").write_bytes(b"not a png")
    cv2.imwrite(str(folder / "stranger.png"), np.zeros((224, 224), np.uint8))
    with pytest.raises(PredictionsError) as caught:
        score_file(protocol, folder, n_resamples=0, log=None, out=tmp_path / "out", plots=False)
    message = str(caught.value)
    assert f"image {ids[0]}: {Path(ids[0]).stem}.png: size 224x100, expected 224x224" in message
    assert f"image {ids[1]}: {Path(ids[1]).stem}.png: 3-D image with 3 channels" in message
    assert f"image {ids[2]}: {Path(ids[2]).stem}.png: not a readable PNG" in message
    assert "1 mask files not named by an id of the test split of fold 1: stranger.png" in message
    assert not (tmp_path / "out").exists()
    # a folder missing more than 5 % of the ids is refused, not scored on the rest
    empty = tmp_path / "few"
    empty.mkdir()
    with pytest.raises(PredictionsError, match=rf"{len(ids)} of {len(ids)} ids of the split missing"):
        score_file(protocol, empty, n_resamples=0, log=None, out=tmp_path / "out", plots=False)
    with pytest.raises(PredictionsError, match="scored from a folder of mask PNGs"):
        score_file(protocol, write_csv(tmp_path / "x.csv", [{"image_id": ids[0]}]), n_resamples=0, log=None,
                   out=tmp_path / "out", plots=False)


def test_mask_values_are_probabilities_thresholded_at_one_half(seg, tmp_path):
    """8-bit 127 is 0.498 (background), 128 is 0.502 (foreground); 16-bit 32768 is 0.50001."""
    protocol, truth = seg
    ids = sorted(truth)
    target = next(i for i in ids if truth[i].any())
    folder = write_masks(tmp_path / "masks", truth, set(ids))
    path = folder / f"{Path(target).stem}.png"
    for pixels, dice in ((truth[target] * np.uint8(127), 0.0), (truth[target] * np.uint8(128), 1.0),
                         (truth[target].astype(np.uint16) * np.uint16(32768), 1.0),
                         (truth[target].astype(np.uint16) * np.uint16(32767), 0.0)):
        cv2.imwrite(str(path), pixels)
        metrics = score_file(protocol, folder, n_resamples=0, log=None, out=tmp_path / "out", plots=False)
        assert metrics["per_image"][target]["dice"] == dice, pixels.max()
