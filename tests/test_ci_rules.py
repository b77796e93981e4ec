"""The suite's own rules: real-data tests skip on a developer machine without the collection,
but fail in CI (.ci/run), and CI runs the README's test command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REQUIRE_SHARED_DATA, locate_shared_data

REPO = Path(__file__).resolve().parents[1]


def test_missing_shared_data_skips_locally_and_fails_where_required(tmp_path, monkeypatch):
    missing = tmp_path / "covid-chestxray"
    monkeypatch.delenv(REQUIRE_SHARED_DATA, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not found"):
        locate_shared_data(missing)
    for value in ("0", "false", ""):
        monkeypatch.setenv(REQUIRE_SHARED_DATA, value)
        with pytest.raises(pytest.skip.Exception):
            locate_shared_data(missing)
    monkeypatch.setenv(REQUIRE_SHARED_DATA, "1")
    with pytest.raises(pytest.fail.Exception, match=f"not found at {missing}.*{REQUIRE_SHARED_DATA}"):
        locate_shared_data(missing)
    missing.mkdir()
    (missing / "metadata.csv").write_text("filename\n")
    assert locate_shared_data(missing) == missing


def test_ci_script_requires_the_shared_data_and_runs_make_test(tmp_path):
    """.ci/run with a stand-in ``make`` on PATH: it is called as ``make test``, from the
    repository root, with the variable set."""
    fake = tmp_path / "bin" / "make"
    fake.parent.mkdir()
    record = tmp_path / "called"
    fake.write_text(f'#!/bin/sh\necho "$PWD|$*|${{{REQUIRE_SHARED_DATA}:-unset}}" > "{record}"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_SHARED_DATA}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run([str(REPO / ".ci" / "run")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert record.read_text().strip() == f"{REPO}|test|1"


def test_make_test_reruns_the_numerics_tests_with_onednn_off():
    """The test target's second command: the `numerics` tests with TF_ENABLE_ONEDNN_OPTS=0."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("test:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    assert recipe[0] == "$(BIN)/python -m pytest -q -n 2"
    assert recipe[1] == 'TF_ENABLE_ONEDNN_OPTS=0 $(BIN)/python -m pytest -q -n 2 -m "numerics and not slow"'


def test_every_module_with_kernel_tolerances_is_in_the_numerics_rerun():
    """A test file that compares values across kernels (it imports tests/tolerances.py) carries the
    `numerics` mark, so the oneDNN-off pass sees its tolerances."""
    unmarked = [path.name for path in sorted((REPO / "tests").glob("test_*.py"))
                if "from tolerances import" in path.read_text() and "pytest.mark.numerics" not in path.read_text()]
    assert unmarked == []


def test_the_numerics_selection_holds_the_kernel_comparisons():
    """What `-m "numerics and not slow"` collects: the tests that compare a traced step, a served
    graph or a strategy with eager kernels (each failed on another CPU once, or could)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "numerics and not slow", "tests"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = {line.split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    for test in ("tests/test_benchmark.py::test_training_step_replica_updates_the_weights_with_the_loss_of_train_py",
                 "tests/test_train.py::test_one_step_is_the_same_on_one_device_and_mirrored_on_two",
                 "tests/test_export.py::test_export_which_final",
                 "tests/test_trained_run.py::test_cv_trains_and_evaluates_a_real_run",
                 "tests/test_metrics.py::test_distributed_custom_loop_matches_single_device"):
        assert test in collected, test
    assert not any(name.startswith("tests/test_ci_rules.py") for name in collected)  # not the whole suite
