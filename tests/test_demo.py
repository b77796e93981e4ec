"""A reduced ``make demo`` end to end in its own process: synthetic data → TFRecords → training →
tables with baselines → export → predictions on source files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _run_demo(out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "caaxr_tf.demo", "--out", str(out), *flags],
        capture_output=True, text=True, env=env, timeout=900,
    )


@pytest.mark.slow
def test_reduced_demo_trains_tabulates_exports_and_predicts(tmp_path):
    out = tmp_path / "demo"
    run = _run_demo(out, "--scale", "tiny", "--workers", "1", "--steps-scale", "0.07", "--protocols", "seg,2class")
    assert run.returncode == 0, run.stderr[-3000:]
    stdout = run.stdout

    for step in range(1, 6):
        assert f"[{step}/5]" in stdout
    assert "Table 1 (segmentation)" in stdout and "Table 2 (2class)" in stdout
    assert "Table 2 (3class)" not in stdout, "--protocols must limit the demo to the protocols named"
    assert stdout.count("constant predictions on the same images") == 2
    assert "all-ones mask" in stdout and "constant (non_covid)" in stdout
    assert "demo finished in" in stdout

    # Only the protocols asked for were written, trained and exported.
    assert sorted(p.name for p in (out / "tfrecords").iterdir() if p.is_dir()) == ["2class", "seg"]
    for protocol, model in (("seg", "unet"), ("2class", "resnet18")):
        assert (out / "cv" / protocol / "results.md").is_file()
        assert (out / "cv" / protocol / model / "fold1" / "final.keras").is_file()
        assert (out / "saved_models" / f"caaxr_{protocol}_{model}" / "1" / "saved_model.pb").is_file()
    models_config = (out / "saved_models" / "models.config").read_text(encoding="utf-8")
    assert "caaxr_2class_resnet18" in models_config and "caaxr_seg_unet" in models_config

    # Four source files through each served model: two 16-bit BIMCV PNGs and two CheXpert JPEGs.
    records = [json.loads(line) for line in stdout.splitlines() if line.strip().startswith("{")]
    classified = [r for r in records if "probabilities" in r]
    segmented = [r for r in records if "mask_area_fraction" in r]
    assert len(classified) == len(segmented) == 4
    assert [r["input"]["format"] for r in classified] == ["png", "png", "jpeg", "jpeg"]
    for record in classified:
        probabilities = record["probabilities"]
        assert sorted(probabilities) == ["covid", "non_covid"]
        np.testing.assert_allclose(sum(probabilities.values()), 1.0, atol=2e-6)
        assert record["predicted_class"] == max(probabilities, key=probabilities.get)
    for record in segmented:
        assert 0.0 <= record["mask_area_fraction"] <= 1.0
        assert Path(record["overlay"]).is_file()


def test_demo_rejects_an_unknown_protocol(tmp_path):
    run = _run_demo(tmp_path / "demo", "--protocols", "seg,5class")
    assert run.returncode == 2
    assert "--protocols: 5class; choose from seg, 2class, 3class, 4class" in run.stderr
    assert not (tmp_path / "demo").exists()
