"""``make-tfrecords --runner beam``: the staging stage on Apache Beam (DirectRunner, 2 worker
processes) writes the same files as the local process pool, byte for byte; a bad image is
reported the same way; a pipeline that fails leaves nothing under a final name."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

beam = pytest.importorskip("apache_beam", reason="apache-beam is the 'beam' extra (pip install 'caaxr-tf[beam]'); "
                                                 "make test installs it")

from caaxr_tf.data import tfrecords as tfr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIRECT = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"
PROTOCOLS = ["seg", "2class"]  # one with boxes and masks-free records, one with replacements; fast


def digests(out: Path) -> dict[str, str]:
    """Every file a build leaves (shards, manifests, summaries), by path."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def build(data: Path, out: Path, lines: list[str] | None = None, **kwargs) -> dict:
    kwargs.setdefault("progress", False)
    return tfr.build_tfrecords(data, out, protocols=PROTOCOLS, folds=2, seed=0,
                               log=(lines.append if lines is not None else lambda line: None), **kwargs)


@pytest.fixture(scope="module")
def data_with_corrupt_image(tiny_data_root, tmp_path_factory) -> tuple[Path, str]:
    data = tmp_path_factory.mktemp("beam_data") / "data"
    shutil.copytree(tiny_data_root, data)
    broken = sorted((data / "bimcv").rglob("*_vp-pa_*.png"))[0]  # a COVID image: in both protocols
    broken.write_bytes(b"not a png")
    return data, str(broken)


@pytest.fixture(scope="module")
def local_build(data_with_corrupt_image, tmp_path_factory) -> Path:
    data, _ = data_with_corrupt_image
    out = tmp_path_factory.mktemp("beam_local") / "out"
    build(data, out, workers=2)
    return out


def test_beam_build_is_byte_identical_to_the_local_build(data_with_corrupt_image, local_build, tmp_path):
    data, broken = data_with_corrupt_image
    lines: list[str] = []
    out = tmp_path / "beam"
    summaries = build(data, out, lines, workers=2, runner="beam", beam_options=DIRECT)

    local, distributed = digests(local_build), digests(out)
    assert sum(name.endswith(".tfrecord") for name in local) >= 2 * 5
    assert local.keys() == distributed.keys()
    differing = [name for name in local if local[name] != distributed[name]]
    assert not differing, f"{len(differing)} files differ between the runners, e.g. {differing[:3]}"

    # the corrupt image: the same skipped line in both runners' summaries (and it was replaced)
    for name in PROTOCOLS:
        beam_skipped = summaries[name]["skipped"]
        local_skipped = json.loads((local_build / name / "summary.json").read_text())["skipped"]
        assert beam_skipped == local_skipped
        assert [s for s in beam_skipped if s["path"] == broken and s["field"] == "image"], beam_skipped
    metrics = [line for line in lines if line.startswith("beam metrics")]
    assert len(metrics) == 1 and "images skipped 1," in metrics[0], lines


# the DirectRunner's job thread reports the failed worker (exit 134) as an unhandled thread exception
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failed_pipeline_leaves_no_final_outputs_and_a_rerun_completes(
        data_with_corrupt_image, local_build, tmp_path, monkeypatch):
    from caaxr_tf.data.beam_build import FAIL_ON_ENV

    data, _ = data_with_corrupt_image
    with open(local_build / "seg" / "manifest.csv", newline="", encoding="utf-8") as handle:
        victim = next(csv.DictReader(handle))["image_id"]  # an image every build stages
    out = tmp_path / "beam"
    monkeypatch.setenv(FAIL_ON_ENV, victim)  # the DirectRunner's worker processes inherit it
    with pytest.raises(tfr.BeamPipelineError, match="Beam staging pipeline failed"):
        build(data, out, workers=2, runner="beam", beam_options=DIRECT)
    finals = [p for p in out.rglob("*") if p.is_file() and not tfr.is_temporary(p)
              and (p.suffix == ".tfrecord" or p.name in ("manifest.csv", "summary.json"))]
    assert not finals, finals

    monkeypatch.delenv(FAIL_ON_ENV)
    build(data, out, workers=2, runner="beam", beam_options=DIRECT)  # reuses what was staged
    assert digests(out) == digests(local_build)


def test_the_command_line_and_the_lazy_import():
    # options that start with "--" are one value with "=" (argparse would take them for its own)
    args = tfr.parse_args(["--data-root", "d", "--out", "o", "--runner", "beam", f"--beam-options={DIRECT}"])
    assert args.runner == "beam" and args.beam_options == DIRECT
    assert tfr.parse_args(["--data-root", "d", "--out", "o"]).runner == "local"
    with pytest.raises(SystemExit):
        tfr.parse_args(["--data-root", "d", "--out", "o", f"--beam-options={DIRECT}"])
    # the local runner's modules import no apache_beam
    code = ("import sys, caaxr_tf.cli, caaxr_tf.data.tfrecords, caaxr_tf.data.staging; "
            "sys.exit('apache_beam' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
