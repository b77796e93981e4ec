"""caaxr_tf.registry.Registry: the one mechanism behind tasks, models, sources and synthetic layouts."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from caaxr_tf.registry import Registry


class UnknownWidgetError(ValueError):
    pass


def test_register_get_and_names():
    widgets = Registry("widget", error=UnknownWidgetError)

    @widgets.register("round")
    def round_widget():
        return "round"

    assert widgets.register("square", "SQUARE") == "SQUARE"
    assert widgets.get("round") is round_widget and widgets.get("square") == "SQUARE"
    assert widgets.names() == ["round", "square"] == list(widgets)
    assert "round" in widgets and "oval" not in widgets
    assert widgets.items() == [("round", round_widget), ("square", "SQUARE")]


def test_a_duplicate_name_is_refused_but_the_same_value_again_is_not():
    widgets = Registry("widget")

    @widgets.register("round")
    def first():
        pass

    widgets.register("round", first)  # a module imported twice registers the same value again
    with pytest.raises(ValueError, match=r"widget 'round' is already registered by .*first"):
        widgets.register("round")(lambda: None)
    assert widgets.get("round") is first


def test_an_unknown_name_says_what_it_meant_and_lists_the_valid_ones():
    widgets = Registry("widget", error=UnknownWidgetError)
    for name in ("round", "square", "triangle"):
        widgets.register(name, name.upper())
    with pytest.raises(UnknownWidgetError,
                       match=r"^unknown widget 'sqare' \(did you mean 'square'\?\); known widgets: round, square, triangle$"):
        widgets.get("sqare")
    with pytest.raises(UnknownWidgetError, match=r"^unknown widget 'hexagon'; known widgets: round, square, triangle$"):
        widgets.get("hexagon")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fresh package on sys.path whose ``__init__`` defines two registries over its modules."""
    name = f"widgets_{tmp_path.name.replace('-', '_')}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent(f"""
        from caaxr_tf.registry import Registry

        ALL = Registry("widget", package={name!r})
        BY_MODULE = Registry("gadget", package={name!r},
                             module_entry=lambda module: module.replace("_", "-") if module.startswith("g_") else None)
        IMPORTED = []
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, root
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _drop(root: Path, module: str, body: str) -> None:
    (root / f"{module}.py").write_text(f"from {root.name} import ALL, BY_MODULE, IMPORTED\n"
                                       f"IMPORTED.append({module!r})\n" + textwrap.dedent(body))
    importlib.invalidate_caches()


def test_discovery_imports_every_module_dropped_into_the_package(package):
    name, root = package
    _drop(root, "round", """
        @ALL.register("round")
        class Round:
            pass
    """)
    _drop(root, "shapes", """
        ALL.register("square", "SQUARE")
        ALL.register("triangle", "TRIANGLE")
    """)
    _drop(root, "_private", "ALL.register('hidden', 1)\n")
    registry = importlib.import_module(name).ALL
    assert registry.get("square") == "SQUARE"
    assert registry.names() == ["round", "square", "triangle"]
    assert registry.get("round").__name__ == "Round"
    assert sorted(importlib.import_module(name).IMPORTED) == ["round", "shapes"]


def test_a_module_named_after_its_entry_is_listed_without_import_and_imported_alone(package):
    name, root = package
    _drop(root, "g_one", "BY_MODULE.register('g-one', 1)\n")
    _drop(root, "g_two", "BY_MODULE.register('g-two', 2)\n")
    _drop(root, "helpers", "raise RuntimeError('not a gadget module: never imported')\n")
    pkg = importlib.import_module(name)
    registry = pkg.BY_MODULE
    assert registry.names() == ["g-one", "g-two"]
    assert pkg.IMPORTED == []  # names come from the module names
    assert registry.builtin_modules() == {"g-one": f"{name}.g_one", "g-two": f"{name}.g_two"}
    assert registry.get("g-two") == 2
    assert pkg.IMPORTED == ["g_two"]  # only the looked-up module
    with pytest.raises(ValueError, match=r"unknown gadget 'g-twoo' \(did you mean 'g-two'\?\); known gadgets: g-one, g-two"):
        registry.get("g-twoo")


def test_the_four_registries_of_caaxr_tf_are_registry_instances():
    from caaxr_tf.data.layouts import LAYOUTS
    from caaxr_tf.data.sources import SOURCES
    from caaxr_tf.tasks import TASKS

    assert isinstance(TASKS, Registry) and isinstance(SOURCES, Registry) and isinstance(LAYOUTS, Registry)
    assert LAYOUTS.names() == ["caaxr", "ct", "qata"]
    assert LAYOUTS.get("qata").manifest_name == "synthetic_qata.json"
    assert {"classification", "segmentation"} <= set(TASKS.names())
    from caaxr_tf.models import MODELS

    assert isinstance(MODELS, Registry) and "unet" in MODELS.names()
