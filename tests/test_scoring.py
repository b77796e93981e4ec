"""caaxr score / caaxr compare (caaxr_tf.scoring, caaxr_tf.compare): the checks of a predictions
file, each on its own; the scores of evaluate's own predictions.csv against its metrics.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from caaxr_tf import cli, compare, scoring
from caaxr_tf.metrics.classification import classification_metrics
from caaxr_tf.scoring import PredictionsError

CLASSES = ["covid", "normal", "pneumonia"]


@pytest.fixture()
def protocol(tmp_path) -> Path:
    """A hand-made protocol folder: summary.json and manifest.csv, 60 test images of 30 patients."""
    folder = tmp_path / "tfrecords" / "3class"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"task": "classification", "classes": CLASSES}))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        label = i % 3
        rows.append({"image_id": f"img{i:03d}", "patient_id": f"p{i // 2:03d}", "source": ["a", "b"][i % 2],
                     "label": CLASSES[label], "label_index": str(label),
                     "split_fold1": "test" if i < 60 else "train", "view": rng.choice(["pa", "ap"])})
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def predictions(protocol: Path, seed: int = 1, prefix: str = "p_") -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    with open(protocol / "manifest.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split_fold1"] == "test"]
    out = []
    for r in rows:
        logits = rng.normal(size=3)
        logits[int(r["label_index"])] += 1.5
        p = np.exp(logits) / np.exp(logits).sum()
        out.append({"image_id": r["image_id"], **{f"{prefix}{c}": f"{v:.6f}" for c, v in zip(CLASSES, p)}})
    return out


def write(path: Path, records: list[dict[str, str]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return path


def score(protocol, path, **kwargs):
    return scoring.score_file(protocol, path, n_resamples=kwargs.pop("n_resamples", 50), plots=False, log=None,
                              out=path.parent / "out", **kwargs)


# --------------------------------------------------------------------------- validation


def test_good_file_scores_csv_and_jsonl_alike(protocol, tmp_path):
    records = predictions(protocol, prefix="")
    a = score(protocol, write(tmp_path / "a.csv", records))
    b = score(protocol, write(tmp_path / "b.jsonl", records))
    for key in ("auc_per_class", "auc_macro", "accuracy", "sensitivity_at_90_specificity", "intervals"):
        assert a[key] == b[key]
    assert a["num_images"] == 60 and a["num_patients"] == 30 and a["missing"] == []
    interval = a["intervals"]["auc_macro"]
    assert interval["low"] <= a["auc_macro"] <= interval["high"] and interval["n_resamples"] == 50
    assert (tmp_path / "out" / "metrics.txt").read_text().count("[") >= 5


@pytest.mark.parametrize("break_it, expected", [
    (lambda r: r.append(dict(r[0])), "duplicated image ids: img000"),
    (lambda r: r.append({**r[0], "image_id": "stranger"}), "1 image ids not in the test split of fold 1"),
    (lambda r: r[3].update(p_normal="nan"), "image img003: p_normal: nan (NaN or infinite)"),
    (lambda r: r[4].update(p_covid="abc"), "image img004: p_covid: not a number ('abc')"),
    (lambda r: r[5].update(p_covid="1.5"), "image img005: p_covid: 1.5 outside [0, 1]"),
    (lambda r: r[6].update(p_covid=str(float(r[6]["p_covid"]) + 0.01)), "image img006: probabilities sum to"),
    (lambda r: [x.pop("p_pneumonia") for x in r], "wrong columns: no probability column for class(es) pneumonia"),
    (lambda r: [x.update(id=x.pop("image_id")) for x in r], "wrong columns: no image_id column"),
    (lambda r: r.__delitem__(slice(0, 4)), "4 of 60 ids of the split missing (6.7%, more than --max-missing 5.0%): "
                                           "img000, img001, img002, img003"),
])
def test_every_bad_file_gives_its_error(protocol, tmp_path, break_it, expected):
    records = predictions(protocol)
    break_it(records)
    with pytest.raises(PredictionsError) as caught:
        score(protocol, write(tmp_path / "bad.csv", records))
    assert expected in str(caught.value)


def test_a_few_missing_ids_are_scored_and_listed(protocol, tmp_path):
    records = predictions(protocol)[2:]
    result = score(protocol, write(tmp_path / "few.csv", records))
    assert result["missing"] == ["img000", "img001"] and result["num_images"] == 58


def test_tolerance_is_the_stated_one(protocol, tmp_path):
    records = predictions(protocol)
    records[0]["p_covid"] = str(float(records[0]["p_covid"]) + 5e-4)
    score(protocol, write(tmp_path / "ok.csv", records))  # within 1e-3
    with pytest.raises(PredictionsError, match="tolerance 0.0001"):
        score(protocol, tmp_path / "ok.csv", tolerance=1e-4)


def test_cli_exit_codes_and_slices(protocol, tmp_path, capsys):
    path = write(tmp_path / "p.csv", predictions(protocol))
    code = cli.main(["score", "--protocol", str(protocol), "--predictions", str(path), "--bootstrap", "40",
                     "--slice-by", "source,view", "--min-slice", "25", "--out", str(tmp_path / "s")])
    assert code == 0
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    rows = {(r["column"], r["value"]): r for r in metrics["slices"]["rows"]}
    assert rows[("source", "a")]["n"] == 30 and rows[("source", "a")]["scored"]
    for name in ("roc.png", "reliability.png", "slices.png"):
        assert (tmp_path / "s" / name).read_bytes()[:4] == b"\x89PNG"
    broken = write(tmp_path / "broken.csv", predictions(protocol)[:10])
    assert cli.main(["score", "--protocol", str(protocol), "--predictions", str(broken)]) == 1
    assert "ids of the split missing" in capsys.readouterr().err


# --------------------------------------------------------------------------- compare


def test_compare_files_and_id_mismatch(protocol, tmp_path):
    a = write(tmp_path / "a.csv", predictions(protocol, seed=1))
    b = write(tmp_path / "b.csv", predictions(protocol, seed=2))
    result = compare.compare(a, b, protocol=protocol, n_resamples=100, out=tmp_path / "cmp", log=None)
    records_a = list(csv.DictReader(open(a)))
    ref = classification_metrics(np.arange(60) % 3, np.array([[float(r[f"p_{c}"]) for c in CLASSES]
                                                             for r in records_a]), CLASSES)
    assert result["delong"]["covid"]["auc_a"] == pytest.approx(ref["auc_per_class"]["covid"], abs=1e-12)
    cell = result["paired_bootstrap"]["auc_per_class/covid"]
    assert cell["difference"] == pytest.approx(result["delong"]["covid"]["difference"], abs=1e-12)
    assert (tmp_path / "cmp" / "roc_compare.png").is_file()
    short = write(tmp_path / "short.csv", predictions(protocol, seed=2)[1:])
    with pytest.raises(compare.IdMismatchError, match="only in A \\(1\\): img000"):
        compare.compare(a, short, protocol=protocol, n_resamples=10, out=tmp_path / "cmp2", log=None)


# --------------------------------------------------------------------------- against caaxr evaluate

from test_evaluate import cls_run, tfrecords  # noqa: E402,F401  (module fixtures: a tiny 3class run)


def test_scoring_evaluate_predictions_reproduces_its_metrics(cls_run, tmp_path):
    from caaxr_tf.evaluate import evaluate_run

    lines = []
    metrics = evaluate_run(cls_run, plots=False, log=lines.append, bootstrap=30)  # evaluate --bootstrap 30
    assert metrics["intervals"]["auc_macro"]["estimate"] == pytest.approx(metrics["auc_macro"], abs=1e-5)
    assert metrics["intervals"]["accuracy"]["n_resamples"] == 30
    assert "95% intervals (patient-clustered bootstrap" in "\n".join(lines)
    protocol = Path(metrics["tfrecords"])
    scored = scoring.score_file(protocol, cls_run / "eval" / "predictions.csv", n_resamples=20, plots=False,
                                log=None, out=tmp_path / "score")
    for key in ("class_names", "covid_class", "auc_per_class", "auc_macro", "sensitivity_at_99_specificity",
                "sensitivity_at_90_specificity", "accuracy", "confusion_matrix", "class_counts", "num_images"):
        assert scored[key] == metrics[key], key
    # run folders compare with themselves: zero differences, p = 1
    same = compare.compare(cls_run, cls_run, n_resamples=20, out=tmp_path / "cmp", plots=False, log=None)
    assert all(t.get("p_value", 1.0) == 1.0 for t in same["delong"].values())


def test_headline_metrics_are_classification_metrics():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 120)
    scores = rng.dirichlet(np.ones(3), 120)
    full = classification_metrics(labels, scores, CLASSES)
    head = scoring.headline_metrics(labels, scores, CLASSES)
    assert head == {"auc_per_class": full["auc_per_class"], **{k: full[k] for k in scoring.SCALAR_KEYS}}


def test_calibrate_on_validation_predictions(protocol, tmp_path):
    # make the fold's train rows its val rows, then give overconfident probabilities on both
    manifest = protocol / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",train,", ",val,"))
    with open(manifest) as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(4)

    def overconfident(split):
        out = []
        for r in rows:
            if r["split_fold1"] != split:
                continue
            logits = rng.normal(size=3)
            logits[int(r["label_index"])] += 0.8
            p = np.exp(4 * logits) / np.exp(4 * logits).sum()
            out.append({"image_id": r["image_id"], **{c: f"{v:.6f}" for c, v in zip(CLASSES, p)}})
        return out

    val = write(tmp_path / "val.csv", overconfident("val"))
    test = write(tmp_path / "test.csv", overconfident("test"))
    result = scoring.score_file(protocol, test, n_resamples=0, plots=False, log=None, out=tmp_path / "o", calibrate_on=val)["temperature_scaling"]
    assert result["temperature"] > 1.5 and result["argmax_unchanged"]
    assert result["validation_nll_after"] < result["validation_nll_before"]
    assert result["after"]["nll"] < result["before"]["nll"]
