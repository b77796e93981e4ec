"""The synthetic data sets: the registry of layouts and the one writer they share.

A layout is a module of this package: ``synthetic.py`` writes the ``caaxr`` layout and
``synthetic_<name>.py`` the layout ``<name>`` (``synthetic_qata.py``: ``qata``). Each defines
what differs — its scales, its plan (the specs of the files to write, in a fixed order), the
worker that draws and writes one spec, the tables and manifest fields written after the
workers, and the printed summary — as a ``Layout`` registered in ``LAYOUTS``. ``write_layout``
does the rest for all of them: the output folder, the worker pool (any number of workers writes
the same bytes: each spec draws from generators seeded by the seed and its index), the
progress bar, removing files an earlier run wrote that this one did not, and the manifest,
written last (its presence marks a complete set). ``main`` is ``caaxr-make-synthetic``.

Adding a layout = one module ``caaxr_tf/data/synthetic_<name>.py`` registering its ``Layout``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from caaxr_tf.io import atomic_path
from caaxr_tf.registry import Registry


@dataclass(frozen=True)
class Layout:
    """What one synthetic layout does differently (see the module docstring).

    ``plan(scale, seed)`` lists the specs; ``task(out_dir, spec, scale, seed)`` is the picklable
    argument of ``write`` (a module-level function run in the workers), which returns the spec's
    manifest entry; ``finish(out, entries, specs, scale, seed)`` writes the tables and returns
    the manifest's fields after ``scale`` and ``seed``, ``files`` (every file written but the
    manifest) among them; ``describe(manifest, out, seconds)`` is the printed summary.
    """

    name: str
    title: str  # the progress bar's label: "<title> <scale>"
    unit: str  # what the progress bar counts (one per spec)
    manifest_name: str
    scales: Mapping[str, Any]
    plan: Callable[[str, int], Sequence[Any]]
    task: Callable[[str, Any, str, int], Any]
    write: Callable[[Any], dict[str, Any]]
    finish: Callable[[Path, list[dict[str, Any]], Sequence[Any], str, int], dict[str, Any]]
    describe: Callable[[dict[str, Any], Path, float], str]
    chunksize: int = 1  # specs per worker hand-out (does not change the output)


def _layout_of_module(module: str) -> str | None:
    """The layout a module of caaxr_tf.data writes (None: not a layout module)."""
    if module == "synthetic":
        return "caaxr"
    if module.startswith("synthetic_"):
        return module[len("synthetic_"):]
    return None


# A layout's module is imported when the layout is looked up (names are known without imports).
LAYOUTS: Registry[Layout] = Registry("layout", package="caaxr_tf.data", module_entry=_layout_of_module)


def register_layout(layout: Layout, module: str) -> Layout:
    """Register ``layout`` (call with the defining module's ``__name__``). A layout module run
    as a script (``__main__``, or ``__mp_main__`` in a spawned worker) does not register: its
    layout is its module imported by name."""
    if module not in ("__main__", "__mp_main__"):
        LAYOUTS.register(layout.name, layout)
    return layout


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name and rename (``caaxr_tf.io.atomic_path``), so a final name
    never holds a partial file. No fsync: a rerun regenerates the same bytes."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)


def remove_stale(out: Path, manifest_name: str, keep: set[str]) -> None:
    """Remove files an earlier (e.g. larger) run listed in its manifest that this run did not write."""
    try:
        old = json.loads((out / manifest_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for relative in old.get("files", []):
        if relative not in keep and ".." not in Path(relative).parts:
            (out / relative).unlink(missing_ok=True)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def write_layout(layout: Layout, out_dir: str | os.PathLike, scale: str = "tiny", seed: int = 0,
                 workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Write ``layout`` at ``scale`` and ``seed`` under ``out_dir``; return its manifest (also
    written to ``out_dir/<layout.manifest_name>``, last)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = layout.plan(scale, seed)
    tasks = [layout.task(str(out), spec, scale, seed) for spec in specs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc=f"{layout.title} {scale}", unit=layout.unit, file=sys.stderr)
    entries: list[dict[str, Any]] = []
    if workers == 1:
        for task in tasks:
            entries.append(layout.write(task))
            if bar is not None:
                bar.update()
    else:
        context = multiprocessing.get_context("spawn")  # safe after TensorFlow is imported
        with context.Pool(workers, initializer=_init_worker) as pool:
            for entry in pool.imap(layout.write, tasks, chunksize=layout.chunksize):
                entries.append(entry)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()

    fields = layout.finish(out, entries, specs, scale, seed)
    remove_stale(out, layout.manifest_name, set(fields["files"]) | {layout.manifest_name})
    manifest = dict(scale=scale, seed=seed, **fields)
    # Written last: its presence marks a complete set.
    write_atomic(out / layout.manifest_name, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``caaxr-make-synthetic``: write a synthetic set in one of the real layouts."""
    parser = argparse.ArgumentParser(
        prog="caaxr-make-synthetic",
        description="Write a synthetic data set in a real layout: caaxr (BIMCV, CAAXR CSVs, CheXpert), "
                    "qata (QaTa-COV19 with infection masks) or ct (COVID-CTset).",
    )
    parser.add_argument("--layout", default="caaxr", choices=LAYOUTS.names(), help="which set (default caaxr)")
    parser.add_argument("--out", required=True, help="data root to write (created if missing)")
    parser.add_argument("--scale", default="tiny", help="caaxr: tiny, small, realistic, paper; qata and ct: tiny, small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    layout = LAYOUTS.get(args.layout)
    if args.scale not in layout.scales:
        parser.error(f"--scale {args.scale!r} is not a scale of the {args.layout} layout; "
                     f"choose from {', '.join(sorted(layout.scales))}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    start = time.perf_counter()
    manifest = write_layout(layout, args.out, scale=args.scale, seed=args.seed, workers=args.workers,
                            progress=args.scale != "tiny")
    print(layout.describe(manifest, Path(args.out), time.perf_counter() - start))
    return 0


__all__ = ["LAYOUTS", "Layout", "main", "register_layout", "remove_stale", "write_atomic", "write_layout"]
