"""The source registry, the sources' typed configs, and the import rules of the data layer."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caaxr_tf.config import load_config
from caaxr_tf.data import sources
from caaxr_tf.data.records import ReadResult
from caaxr_tf.data.sources.caaxr import CaaxrSourceConfig, read_caaxr
from caaxr_tf.data.sources.chexpert import ChexpertConfig, read_chexpert

REPO = Path(__file__).resolve().parents[1]
EXPECTED_SOURCES = ["caaxr", "chexpert", "covid-chestxray", "covid-chestxray-lungs", "covid-chestxray-severity",
                    "covid-ctset", "qata"]


def test_every_source_is_registered_with_its_sections():
    assert sources.available_sources() == EXPECTED_SOURCES
    assert {name: sources.get_source(name).sections for name in EXPECTED_SOURCES} == {
        "caaxr": ("caaxr", "bimcv"),
        "chexpert": ("chexpert",),
        "covid-chestxray": ("covid_chestxray",),
        "covid-chestxray-lungs": ("covid_chestxray_lungs", "covid_chestxray"),
        "covid-chestxray-severity": ("covid_chestxray_severity", "covid_chestxray"),
        "covid-ctset": ("covid_ctset",),
        "qata": ("qata",),
    }
    # every section of caaxr_tf/configs/data.yaml is read by some source, and nothing else is there
    assert set(sources.data_sections()) == set(load_config("data"))


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(sources.UnknownSourceError) as caught:
        sources.get_source("chexpret")
    message = str(caught.value)
    assert "unknown source 'chexpret' (did you mean 'chexpert'?)" in message
    assert message.endswith("known sources: " + ", ".join(EXPECTED_SOURCES))
    with pytest.raises(sources.UnknownSourceError, match="unknown source 'nih'"):
        sources.read_source("nih", REPO)


@pytest.mark.parametrize("name", EXPECTED_SOURCES)
def test_config_defaults_equal_configs_data_yaml(name):
    """A reader called with no config behaves as with caaxr_tf/configs/data.yaml."""
    spec = sources.get_source(name)
    assert sources.source_config(name, load_config("data")) == spec.config() == sources.source_config(name, None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["chexpert.uncertian=positive"],
         "unknown key 'uncertian' in chexpert (did you mean 'uncertain'?); valid keys: csv_files, frontal_only, "
         "root, uncertain"),
        (["caaxr.box_columns.xmax=x2"], "unknown key 'xmax' in caaxr.box_columns (did you mean 'x_max'?); valid keys: "),
        (["bimcv.frontal=[pa]"], "unknown key 'frontal' in bimcv (did you mean 'frontal_views'?)"),
        (["qata.masks=gt"], "unknown key 'masks' in qata (did you mean 'masks_dir'?)"),
        (["covid_chestxray_lungs.mask=m"], "unknown key 'mask' in covid_chestxray_lungs (did you mean 'masks'?)"),
        (["chexpert.uncertain=maybe"], "chexpert.uncertain must be one of exclude, positive, negative, got 'maybe'"),
        (["covid_ctset.check_headers=1"], "covid_ctset.check_headers must be true or false, got 1"),
        (["covid_chestxray.row_filter={includes: {}}"], r"covid_chestxray.row_filter: unknown key(s) ['includes']"),
        (["chexpret.root=x"], "unknown section 'chexpret' in the data config (did you mean 'chexpert'?); valid sections: "
                              "bimcv, caaxr, chexpert, covid_chestxray, "),
    ],
)
def test_data_config_is_strict(overrides, message):
    with pytest.raises(ValueError) as caught:
        sources.check_data_config(load_config("data", overrides))
    assert message in str(caught.value)


def test_read_source_uses_the_sections_and_a_reader_runs_on_defaults(tiny_data_root):
    data = load_config("data")
    by_registry = sources.read_source("caaxr", tiny_data_root, data)
    assert by_registry == read_caaxr(tiny_data_root) == sources.get_source("caaxr").read(tiny_data_root)
    assert len(by_registry.samples) == 40 and by_registry.skipped == []
    # the chexpert reader resolves its root below the data root; read_chexpert takes the folder itself
    chexpert = sources.read_source("chexpert", tiny_data_root, data)
    assert chexpert == read_chexpert(tiny_data_root / "chexpert") and len(chexpert.samples) == 55
    # a section's setting reaches the reader: only lateral views kept -> no annotated image left
    counts = json.loads((tiny_data_root / "synthetic.json").read_text())["counts"]
    nothing = sources.read_source("caaxr", tiny_data_root, load_config("data", ["bimcv.frontal_views=[ll]"]))
    assert nothing.samples == [] and nothing.excluded == {
        "non-frontal view": counts["covid_boxes"] + counts["covid_no_boxes"] + counts["bimcv_unlisted"],
        "not in CAAXR study-level annotations": counts["bimcv_lateral"],
    }
    # a typed config given directly is used as it is
    typed = CaaxrSourceConfig(bimcv=dataclasses.replace(CaaxrSourceConfig().bimcv, frontal_views=("ll",)))
    assert read_caaxr(tiny_data_root, typed) == nothing
    # U-Ones turns the uncertain labels of the tiny set into 1.0
    ones = sources.read_source("chexpert", tiny_data_root, {"chexpert": {"uncertain": "positive"}})
    values = {v for s in ones.samples for v in s.labels.values()}
    assert -1.0 in {v for s in chexpert.samples for v in s.labels.values()} and -1.0 not in values
    assert sources.source_config("chexpert", {"chexpert": {"uncertain": "positive"}}) == ChexpertConfig(uncertain="positive")


def test_register_source_checks_its_arguments():
    @dataclasses.dataclass(frozen=True)
    class Two:
        a: int = 1

    with pytest.raises(TypeError, match="exactly one field per section"):
        sources.register_source("two", section=("a", "b"), config=Two)
    with pytest.raises(TypeError, match="must be a dataclass"):
        sources.register_source("plain", section="x", config=dict)

    def other_reader(data_root, config):  # pragma: no cover - never called
        return ReadResult()

    with pytest.raises(ValueError, match="source 'chexpert' is already registered"):
        sources.register_source("chexpert", section="chexpert", config=ChexpertConfig)(other_reader)


# --------------------------------------------------------------------------- import rules

DATA = REPO / "caaxr_tf" / "data"


def module_imports(path: Path) -> set[str]:
    """The caaxr_tf modules a file imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("caaxr_tf"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("caaxr_tf"))
    return found


def test_the_data_layer_has_no_import_cycle():
    modules = {}
    for path in sorted(DATA.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: {m for m in module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "caaxr_tf.data.images" not in graph["caaxr_tf.data.dicom"]


def run_on_a_tiny_dicom(tmp_path: Path, script: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``script`` in a fresh interpreter with the path of a written 4x4 uint16 DICOM as its argument."""
    from caaxr_tf.data.synthetic_ct import write_dicom_series

    raw = np.arange(4 * 4, dtype=np.uint16).reshape(1, 4, 4) * 100
    path = write_dicom_series(tmp_path, raw, patient_id="p1", shuffle_names=False)[0]
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    return done, path


IMAGE_READER_SIDE = r"""
import sys
from caaxr_tf.data.images import load_image
before = "pydicom" in sys.modules
pixels = load_image(sys.argv[1]).pixels
print(before, "pydicom" in sys.modules, pixels.dtype, pixels.shape)
"""


def test_the_image_reader_loads_pydicom_only_when_it_meets_a_dicom(tmp_path):
    # a staging worker imports caaxr_tf.data.images; pydicom at module level cost its start-up 0.15 s
    done, _ = run_on_a_tiny_dicom(tmp_path, IMAGE_READER_SIDE)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:2] == ["False", "True"], done.stdout


READING_SIDE = r"""
import sys
import caaxr_tf.data.formats, caaxr_tf.data.schema, caaxr_tf.data.bimcv, caaxr_tf.data.protocols
from caaxr_tf.data.dicom import read_dicom
from caaxr_tf.data.protocols import available_protocols
assert "covid-ctset" in available_protocols()
pixels = read_dicom(sys.argv[1]).pixels
print(pixels.dtype, pixels.shape, pixels.tobytes().hex())
print(sorted(m for m in ("cv2", "tensorflow", "caaxr_tf.data.images", "caaxr_tf.data.tfrecords") if m in sys.modules))
"""


def test_reading_side_modules_and_read_dicom_do_not_import_opencv(tmp_path):
    from caaxr_tf.data.dicom import read_dicom

    done, path = run_on_a_tiny_dicom(tmp_path, READING_SIDE)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = read_dicom(path).pixels
    assert len(np.unique(expected)) == 16  # the pixels really were decoded
    assert done.stdout.splitlines() == [f"uint16 (4, 4) {expected.tobytes().hex()}", "[]"]
