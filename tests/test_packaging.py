"""Packaging and the one command: the YAML settings are package data, the benchmarks stay out of
the package, ``caaxr <verb>`` runs every entry point under one error policy, and a wheel built
from the tree works when installed (non-editable) and run from another folder."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import types
import zipfile
from pathlib import Path

import pytest

from caaxr_tf import cli
from caaxr_tf.config import CONFIG_DIR, packaged_config_dir

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "caaxr_tf"
CONFIG_FILES = {"train.yaml", "data.yaml", "protocols.yaml", "seg_cpu_short.yaml", "ct_cpu_short.yaml"}


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def console_scripts() -> dict[str, str]:
    lines = setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if line.strip())


# --------------------------------------------------------------------------- package data


def test_configs_are_package_data():
    assert packaged_config_dir() == PACKAGE / "configs"
    if not os.environ.get("CAAXR_CONFIG_DIR"):
        assert CONFIG_DIR == PACKAGE / "configs"
    assert CONFIG_FILES <= {p.name for p in (PACKAGE / "configs").glob("*.yaml")}
    assert not (REPO / "configs").exists()  # one copy, inside the package
    assert setup_cfg()["options.package_data"]["caaxr_tf"].split() == ["configs/*.yaml"]


def test_benchmarks_are_outside_the_package():
    assert (REPO / "benchmarks" / "benchmark.py").exists() and (REPO / "benchmarks" / "ct.py").exists()
    assert not list(PACKAGE.rglob("benchmark.py"))
    assert setup_cfg()["options.packages.find"]["include"].replace(" ", "").split(",") == ["caaxr_tf", "caaxr_tf.*"]
    assert "caaxr-benchmark" not in console_scripts()
    importer = re.compile(r"^\s*(from\s+benchmarks\b|import\s+benchmarks\b)", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if importer.search(p.read_text())]
    assert offenders == [], "caaxr_tf must not import the benchmarks"


# --------------------------------------------------------------------------- the caaxr command


def modules_with_a_main() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "def main(" in text and re.search(r"^if __name__ == .__main__.:", text, re.MULTILINE):
            found.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    return found - {"caaxr_tf.cli", "caaxr_tf.__main__"}


def test_every_main_is_a_verb_and_every_console_script_an_alias():
    assert {verb.module for verb in cli.VERBS.values()} == modules_with_a_main()
    scripts = console_scripts()
    assert scripts.pop("caaxr") == "caaxr_tf.cli:main"
    for script, target in scripts.items():
        module, attribute = target.split(":")
        assert module == "caaxr_tf.cli" and script.startswith("caaxr-"), (script, target)
        verb = script[len("caaxr-"):]
        assert verb in cli.VERBS and getattr(cli, attribute).__name__ == verb.replace("-", "_"), script


def test_help_lists_the_verbs_and_imports_no_tensorflow():
    code = ("import sys\nfrom caaxr_tf import cli\nrc = cli.main(['--help'])\n"
            "print('TF' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'no TF', rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("no TF 0")
    for name, verb in cli.VERBS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(verb.summary)}$", done.stdout, re.MULTILINE), name


def test_verb_help_and_unknown_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ct-select", "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
    assert cli.main(["trian"]) == 2
    assert "unknown verb 'trian'; did you mean train?" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "verbs:" in capsys.readouterr().err


@pytest.fixture
def fake_verb(monkeypatch):
    """A verb ``fake`` whose main raises what ``fake.raised`` holds (or returns 3)."""
    module = types.ModuleType("caaxr_fake_verb")
    module.raised = None
    module.seen = []

    def main(argv):
        module.seen.append((list(argv), sys.argv[0]))
        if module.raised is not None:
            raise module.raised
        return 3

    module.main = main
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.VERBS, "fake", cli.Verb(module.__name__, "a test verb"))
    return module


def test_error_policy(fake_verb, capsys):
    from caaxr_tf.config import ConfigError
    from caaxr_tf.data.records import InputError, SchemaError
    from caaxr_tf.locks import FolderLockedError

    assert cli.main(["fake", "--x", "1"]) == 3  # the verb's own code, its argv, prog "caaxr fake"
    assert fake_verb.seen == [(["--x", "1"], "caaxr fake")]
    cases = [(ConfigError("epochs: must be at least 1"), 2, "error: epochs: must be at least 1"),
             (InputError("a.csv", "age", "not a number"), 1, "error: a.csv: age: not a number"),
             (SchemaError("b.csv", "columns", "no filename"), 1, "error: b.csv: columns: no filename"),
             (FolderLockedError(Path("runs/x"), {"pid": 7}), 1,
              "error: runs/x is in use by another run: pid 7; wait for it to finish or use another folder"),
             (FileNotFoundError("config file not found: x.yaml"), 1, "error: config file not found: x.yaml")]
    for error, code, line in cases:
        fake_verb.raised = error
        assert cli.main(["fake"]) == code, error
        err = capsys.readouterr().err
        assert err.strip() == line and "Traceback" not in err
    fake_verb.raised = ValueError("a bug, not a user error")
    with pytest.raises(ValueError, match="a bug"):  # unexpected: the traceback is kept
        cli.main(["fake"])
    fake_verb.raised = SystemExit(2)  # argparse's usage errors pass through
    with pytest.raises(SystemExit):
        cli.main(["fake"])


def test_console_script_alias_runs_its_verb(fake_verb, monkeypatch):
    alias = cli._alias("fake")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/caaxr-fake", "--y"])
    assert alias() == 3
    assert fake_verb.seen == [(["--y"], "caaxr-fake")]
    assert sys.argv[0] == "/venv/bin/caaxr-fake"  # restored


def test_python_m_caaxr_tf_runs_a_verb(tmp_path):
    done = subprocess.run([sys.executable, "-m", "caaxr_tf", "train", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: caaxr train")


# --------------------------------------------------------------------------- a wheel that works


def installed_env() -> dict[str, str]:
    """The environment of the installed commands: nothing that points at the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAAXR_CONFIG_DIR", "PYTHONHOME")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INDEX": "1", "PYTHONNOUSERSITE": "1"}


def run_ok(command: list[str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, env=installed_env(),
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_and_trains_from_another_folder(tmp_path):
    """Build a wheel from a copy of the tree (setuptools and wheel of this interpreter, no
    network), install it non-editable into a fresh venv whose only other packages are this
    interpreter's site-packages (one ``.pth`` line: TensorFlow is not downloaded again, and the
    editable install's finder there is not activated), then from an empty folder: ``caaxr
    --help``, ``caaxr train --help`` and a tiny make-synthetic, make-tfrecords, train."""
    started = time.perf_counter()
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / "caaxr_tf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    run_ok([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
            "-w", dist, source], tmp_path)
    wheels = list(dist.glob("caaxr_tf-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
    assert {f"caaxr_tf/configs/{name}" for name in CONFIG_FILES} <= names
    assert not [n for n in names if n.startswith("benchmarks/") or n.endswith("benchmark.py")]

    venv = tmp_path / "venv"
    run_ok([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = Path(run_ok([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "_caaxr_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run_ok([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheels[0]], tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run_ok([python, "-c", "import caaxr_tf, caaxr_tf.config as c; print(caaxr_tf.__file__); print(c.CONFIG_DIR)"],
                   work).split()
    assert [Path(p).is_relative_to(site) for p in where] == [True, True], where
    assert Path(where[1], "train.yaml").is_file()
    caaxr = venv / "bin" / "caaxr"
    assert "make-tfrecords" in run_ok([caaxr, "--help"], work)
    assert run_ok([caaxr, "train", "--help"], work).startswith("usage: caaxr train")
    assert "usage: caaxr-train" in run_ok([venv / "bin" / "caaxr-train", "--help"], work)

    run_ok([caaxr, "make-synthetic", "--out", "data", "--scale", "tiny"], work)
    run_ok([caaxr, "make-tfrecords", "--data-root", "data", "--out", "tfrecords", "--protocol", "seg",
            "--workers", "1", "--no-progress"], work)
    out = run_ok([caaxr, "train", "--protocol", "seg", "--model", "unet", "--tfrecords", "tfrecords", "--out", "run",
                  "--epochs", "1", "--steps-per-epoch", "2", "--set", "image_size=64",
                  "--set", "model_kwargs.base_filters=4", "--quiet"], work)
    assert "done: run" in out
    assert (work / "run" / "config.yaml").is_file() and (work / "run" / "best.keras").is_file()
    # a usage error from the installed command: one line, exit 2, no traceback
    bad = subprocess.run([str(caaxr), "train", "--protocol", "seg", "--model", "unet", "--tfrecords", "tfrecords",
                          "--out", "run2", "--set", "epochs=0"], capture_output=True, text=True, cwd=work,
                         env=installed_env(), timeout=300)
    # (TensorFlow's absl start-up lines may come before it whatever TF_CPP_MIN_LOG_LEVEL says)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "error: epochs must be an integer >= 1, got 0"
    assert time.perf_counter() - started < 240
