"""The suite's own rules: real-data tests skip on a developer machine without the collection,
but fail in CI (.ci/run), and CI runs the README's test command."""

from __future__ import annotations

import os
import subprocess
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
