"""Export a trained run as a TensorFlow Serving SavedModel.

    python -m caaxr_tf.export --run RUN_DIR --out saved_models/NAME [--version N] [--overwrite]
        [--which best|final] [--serving-root /models]

writes ``saved_models/NAME/N/`` (``N`` defaults to the next free version) and rewrites
``saved_models/models.config``, a ``model_config_list`` naming every model exported under
``saved_models/``. The SavedModel is written to a hidden temporary folder, checked against the
Keras model and renamed to ``N`` when complete, so TF Serving (which watches ``NAME/`` for
integer-named folders) never sees a partial version.

Signatures (see docs/serving.md):

* ``serving_default``: ``images`` (string [N], encoded PNG 8/16-bit or JPEG), optional
  ``invert`` (bool [N]) and ``bit_depth`` (int32 [N]; 0 = the file's own depth). The training
  preprocessing (``caaxr_tf.data.pipeline.preprocess_image``) runs in the graph.
* ``predict_preprocessed``: ``images`` float32 [N, 224, 224, 1] in 0..255.

Both return ``probabilities`` [N, C], ``predicted_class`` [N] and ``class_names`` [N, C] for
classifiers, ``mask`` [N, 224, 224, 1] for segmentation models, and every entry of a model that
returns a dict (Mask R-CNN: ``mask``, ``boxes``, ``scores``, ``classes``, ``num_detections``).

``--cam`` (classifiers only, off by default) adds the output ``cam`` [N, 224, 224] float32 in
0..1: the Grad-CAM of each image's predicted class (``caaxr_tf.explain.gradcam``, default
target layer, logit scores), with the gradients computed inside the serving graph. It costs a
backward pass per request.

A run calibrated by ``caaxr calibrate`` (RUN_DIR/calibration.json of the exported checkpoint)
is served temperature-scaled: ``probabilities`` are ``softmax(log(p) / T)`` (a
``TemperatureScaling`` layer after the model, inside both signatures and inside the check of
the reloaded export), and the metadata's ``calibration`` holds ``T`` and the operating
thresholds that ``caaxr predict`` turns into decisions. ``--no-calibration`` serves the raw
probabilities.

``--precision bfloat16`` (``float16`` on GPUs; ``caaxr_tf.models.precision``) serves the model
computing in that precision: both signatures keep float32 inputs and outputs, the check of
the reloaded export compares it with the float32 Keras model within
``caaxr_tf.models.precision.tolerance(precision)`` (bfloat16: 2^-4) instead of
``VERIFY_TOLERANCE``, and the metadata records ``precision``. Not with ``--cam``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from caaxr_tf.logs import quiet_tensorflow_logs

quiet_tensorflow_logs()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caaxr_tf.data.pipeline import IMAGE_SIZE  # noqa: E402
from caaxr_tf.data.serving import (  # noqa: E402,F401  (the serving input ops; re-exported)
    PNG_SIGNATURE,
    JPEG_SIGNATURE,
    PNG_BIT_DEPTH_OFFSET,
    HEADER_BYTES,
    image_headers,
    _starts_with,
    file_bit_depths,
    _per_image,
    decode_images,
    runtime_shape,
    assert_rank_one,
    assert_image_shape,
    check_preprocessed,
)
from caaxr_tf.explain.gradcam import GradCam, make_cam_function, resolve_layer_path  # noqa: E402
from caaxr_tf.runs import Run  # noqa: E402
from caaxr_tf.tasks import get_task  # noqa: E402
from caaxr_tf.tasks.options import add_task_arguments, task_options  # noqa: E402
from caaxr_tf.models.precision import add_precision_argument, check_precision  # noqa: E402

if TYPE_CHECKING:
    from caaxr_tf.tasks import Task

SERVING_SIGNATURE = "serving_default"
PREPROCESSED_SIGNATURE = "predict_preprocessed"
MODELS_CONFIG = "models.config"
METADATA_PATH = "assets.extra/caaxr_export.json"
METADATA_FORMAT = 1

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VERIFY_TOLERANCE = 1e-4
# A CAM is divided by its maximum: float32 round-off in a map with a small peak shows more.
CAM_VERIFY_TOLERANCE = 1e-3


# --------------------------------------------------------------------------- signatures


def resolve_export_task(task: "str | Task", class_names: Sequence[str] = ()) -> "Task":
    """A Task object for an export: given, or a registered task name (an unknown name is a
    ValueError listing the known tasks)."""
    return task if not isinstance(task, str) else get_task(task)(list(class_names))


def check_cam_export(task: "Task") -> None:
    """A ``cam`` output needs a classifier (``Task.supports_cam``)."""
    if not getattr(task, "supports_cam", False):
        raise ValueError(f"--cam needs a classifier; this run's task is {task.name!r}")


def make_export_archive(
    model, *, task: "str | Task", class_names: Sequence[str] = (), image_size: int = IMAGE_SIZE,
    cam: bool = False,
):
    """A ``keras.export.ExportArchive`` with the ``serving_default`` and
    ``predict_preprocessed`` endpoints around ``model`` (called with ``training=False``); the
    task names the outputs (``Task.serving_outputs``). ``cam`` adds the Grad-CAM output ``cam``
    [N, S, S] of the predicted class (classifiers only)."""
    import keras

    task = resolve_export_task(task, class_names)
    image_shape = [None, image_size, image_size, 1]
    cam_function = None
    if cam:
        check_cam_export(task)
        cam_function = make_cam_function(model, output_size=(image_size, image_size))

    # One traced graph of the model, called by both signatures: tracing a large model (DenseNet)
    # twice doubled the export's time.
    @tf.function(input_signature=[tf.TensorSpec(image_shape, tf.float32)])
    def run_model(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = task.serving_outputs(model(pixels, training=False))
        if cam_function is not None:
            outputs["cam"] = cam_function(pixels)["cam"]
        return outputs

    # Empty tensors as defaults: TF Serving fills an input missing from a request with its
    # SignatureDef default, and a [0] tensor fits the [N] spec whatever N is.
    def serving_default(
        images: tf.Tensor,
        invert: tf.Tensor = tf.zeros([0], tf.bool),
        bit_depth: tf.Tensor = tf.zeros([0], tf.int32),
    ) -> dict[str, tf.Tensor]:
        return run_model(task.serving_inputs(images, invert, bit_depth, image_size))

    def predict_preprocessed(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return run_model(task.check_preprocessed(images, image_size))

    # No archive.track(model): the endpoints capture the variables already, and tracking the
    # Keras variables as well would store every weight twice.
    archive = keras.export.ExportArchive()
    archive.add_endpoint(
        SERVING_SIGNATURE,
        serving_default,
        input_signature=[
            tf.TensorSpec([None], tf.string, name="images"),
            tf.TensorSpec([None], tf.bool, name="invert"),
            tf.TensorSpec([None], tf.int32, name="bit_depth"),
        ],
    )
    archive.add_endpoint(
        PREPROCESSED_SIGNATURE,
        predict_preprocessed,
        input_signature=[tf.TensorSpec(image_shape, tf.float32, name="images")],
    )
    return archive


def verify_export(model, export_dir: str | Path, image_size: int, task: "str | Task",
                  seed: int = 0, cam: bool = False, tolerance: float = VERIFY_TOLERANCE) -> float:
    """Largest absolute difference between the Keras model's outputs, named by the task, and the
    reloaded export on random images (``predict_preprocessed``); raises ``RuntimeError`` above
    ``VERIFY_TOLERANCE`` (``CAM_VERIFY_TOLERANCE`` for ``cam``, checked against
    ``GradCam(model)`` when ``cam``); ``tolerance`` replaces ``VERIFY_TOLERANCE`` (an export in
    reduced precision checked against the float32 model)."""
    task = resolve_export_task(task)
    images = np.random.default_rng(seed).uniform(0, 255, (2, image_size, image_size, 1)).astype(np.float32)
    expected = {key: np.asarray(value) for key, value in task.serving_outputs(model(images, training=False)).items()}
    loaded = tf.saved_model.load(str(export_dir))
    got = loaded.signatures[PREPROCESSED_SIGNATURE](images=tf.constant(images))
    if cam:
        reference = GradCam(model, output_size=(image_size, image_size), run_eagerly=True)(images).cam
        exported_cam = got["cam"].numpy()
        cam_error = float(np.max(np.abs(exported_cam - reference))) if np.all(np.isfinite(exported_cam)) else np.inf
        if cam_error > CAM_VERIFY_TOLERANCE:
            raise RuntimeError(f"the exported cam at {export_dir} differs from Grad-CAM of the Keras model by {cam_error:g}")
    worst = 0.0
    for name, value in expected.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        exported = got[name].numpy()
        # max() with a NaN would pass silently: a model with NaN weights must not be exported
        for which, array in (("Keras model", value), ("export", exported)):
            if not np.all(np.isfinite(array)):
                raise RuntimeError(
                    f"the {which} gives non-finite values (NaN or Inf) in {name!r} on random images: "
                    f"the model is broken (e.g. trained with a non-finite loss); {export_dir} is not kept"
                )
        worst = max(worst, float(np.max(np.abs(exported - value.astype(np.float32)))))
    if worst > tolerance:
        raise RuntimeError(f"the export at {export_dir} differs from the Keras model by {worst:g} "
                           f"(tolerance {tolerance:g})")
    return worst


# --------------------------------------------------------------------------- layout


def list_versions(model_base: str | Path) -> list[int]:
    """Versions present under ``saved_models/NAME`` (integer-named folders, as TF Serving reads them)."""
    model_base = Path(model_base)
    if not model_base.is_dir():
        return []
    return sorted(int(p.name) for p in model_base.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(model_base: str | Path) -> int:
    versions = list_versions(model_base)
    return versions[-1] + 1 if versions else 1


def _version_dirs(model_base: Path, version: int) -> list[Path]:
    return [p for p in model_base.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) == version]


def _escape(text: str) -> str:
    from google.protobuf import text_encoding

    return text_encoding.CEscape(text, as_utf8=True)


def _config_prefix(config_path: Path) -> str | None:
    """The folder that every ``base_path`` of an existing models.config lies in, if common."""
    if not config_path.exists():
        return None
    text = config_path.read_text(encoding="utf-8")
    prefixes = set()
    for name, path in re.findall(r'name:\s*"([^"]*)"\s*base_path:\s*"([^"]*)"', text):
        if not path.endswith("/" + name):
            return None
        prefixes.add(path[: -len(name) - 1] or "/")
    return prefixes.pop() if len(prefixes) == 1 else None


def _is_absolute(path: str) -> bool:
    return path.startswith("/") or "://" in path


def write_models_config(root: str | Path, serving_root: str | None = None) -> Path:
    """Rewrite ``root/models.config`` listing every model folder under ``root`` with a version.

    ``base_path`` is ``serving_root/NAME``. TF Serving's model server requires absolute base
    paths (or URIs), so ``serving_root`` defaults to the prefix the existing file already uses,
    else to the absolute path of ``root``; pass the path the server sees (e.g. ``/models`` for
    the Docker image with ``-v $PWD/saved_models:/models``). Written atomically.
    """
    root = Path(root)
    config_path = root / MODELS_CONFIG
    prefix = serving_root or _config_prefix(config_path) or str(root.resolve())
    prefix = prefix.rstrip("/") or "/"
    if not _is_absolute(prefix):
        raise ValueError(
            f"serving root {prefix!r} must be an absolute path or a URI (TF Serving rejects relative base paths)"
        )
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and list_versions(p))
    lines = [
        "# Written by caaxr_tf.export: every model under this folder. Regenerated on each export.",
        "model_config_list {",
    ]
    for name in names:
        base_path = f"{prefix.rstrip('/')}/{name}"
        lines += [
            "  config {",
            f'    name: "{_escape(name)}"',
            f'    base_path: "{_escape(base_path)}"',
            '    model_platform: "tensorflow"',
            "  }",
        ]
    lines.append("}")
    temporary = config_path.with_name(f".{MODELS_CONFIG}.tmp-{os.getpid()}")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(temporary, config_path)
    return config_path


def export_model(
    model,
    export_dir: str | Path,
    *,
    task: "str | Task",
    class_names: Sequence[str] = (),
    image_size: int = IMAGE_SIZE,
    metadata: Mapping[str, Any] | None = None,
    verify: bool = True,
    cam: bool = False,
    precision: str = "float32",
) -> Path:
    """Write ``model`` as a SavedModel at ``export_dir`` (which must not exist); ``cam`` adds
    the Grad-CAM output (classifiers only, see the module docstring); ``precision`` serves it
    computing in bfloat16/float16 (float32 inputs and outputs), checked against ``model``."""
    from caaxr_tf.models.precision import check_precision, tolerance, with_precision

    export_dir = Path(export_dir)
    task = resolve_export_task(task, class_names)
    if cam:
        check_cam_export(task)
    check_precision(precision)
    if cam and precision != "float32":
        raise ValueError(f"--cam is exported in float32 only, not with --precision {precision}")
    task.check_model(model, image_size)
    served = with_precision(model, precision)
    archive = make_export_archive(served, task=task, class_names=class_names, image_size=image_size, cam=cam)
    archive.write_out(str(export_dir), verbose=False)
    if verify:
        verify_export(model, export_dir, image_size, task, cam=cam,
                      tolerance=VERIFY_TOLERANCE if precision == "float32" else tolerance(precision))
    if cam:
        metadata = {**(metadata or {}), "cam": {"output": "cam", "class": "predicted", "score": "logit",
                                                "layer": "/".join(resolve_layer_path(model)),
                                                "size": [image_size, image_size]}}
    info = {
        "format": METADATA_FORMAT,
        "task": task.name,
        "class_names": list(class_names),
        "target_names": list(task.target_names),
        **({"target_ranges": dict(task.target_ranges)} if getattr(task, "target_ranges", None) else {}),
        "image_size": image_size,
        "precision": precision,
        "signatures": {
            SERVING_SIGNATURE: {"inputs": ["images", "invert", "bit_depth"]},
            PREPROCESSED_SIGNATURE: {"inputs": ["images"]},
        },
        "tensorflow": tf.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(metadata or {}),
    }
    (export_dir / METADATA_PATH).parent.mkdir(parents=True, exist_ok=True)
    (export_dir / METADATA_PATH).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return export_dir


_TEMPORARY_PATTERN = re.compile(r"^\.(export|retired)-\d+-(\d+)\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(model_base: str | Path) -> list[Path]:
    """Clean up after killed exports (their PID no longer runs on this machine): remove
    ``.export-N-PID.tmp`` folders, and ``.retired-N-PID.tmp`` ones (the old version an
    ``--overwrite`` had moved aside) unless version N is missing, which they then restore.
    Returns the folders removed or restored.

    Export folders on a file system shared between machines could belong to a live export
    on another host with the same PID number; such a folder is only removed when no process
    here has that PID, which is the usual case but not a guarantee.
    """
    removed = []
    model_base = Path(model_base)
    if not model_base.is_dir():
        return removed
    for path in model_base.iterdir():
        match = _TEMPORARY_PATTERN.match(path.name)
        if not match or not path.is_dir() or int(match.group(2)) == os.getpid() or _process_alive(int(match.group(2))):
            continue
        version = path.name.split("-")[1]
        if match.group(1) == "retired" and not _version_dirs(model_base, int(version)):
            os.rename(path, model_base / version)  # killed between moving the old version aside and the new in
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def with_lung_run(model, task: "Task", lung_run: str | Path, image_size: int):
    """One Keras model running the infection ``model`` and the lung run's best model (outputs
    ``{"mask", "lungs"}``); a ValueError for a task that takes no lung run. (The task's
    `Task.serving_model` with the option ``lung_run``.)"""
    options = task.check_options({"lung_run": lung_run})
    return task.serving_model(model, image_size, options, Run)[0]


def export_run(
    run_dir: str | Path,
    out: str | Path,
    version: int | None = None,
    overwrite: bool = False,
    *,
    which: str = "best",
    serving_root: str | None = None,
    verify: bool = True,
    cam: bool = False,
    lung_run: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    precision: str = "float32",
    calibration: bool = True,
) -> Path:
    """Export ``RUN_DIR/best.keras`` to ``out/<version>`` and update ``out/../models.config``.

    ``lung_run`` (infection runs only): a lungs-protocol segmentation run served in the same
    graph (`with_lung_run`): the map is restricted to its lungs and per-lung fractions are output.

    ``calibration`` (default on): when the run has a calibration.json of this checkpoint
    (``caaxr calibrate``), the export serves the temperature-scaled probabilities and its
    metadata holds the temperature and the operating thresholds; one fitted on another
    checkpoint is a ``CalibrationError`` before anything is written. ``False`` exports the raw
    probabilities.

    Returns the version folder. ``version`` defaults to the next free one; an existing version
    is a ``FileExistsError`` unless ``overwrite``. ``cam`` adds the Grad-CAM output (a
    ``ValueError`` for a run that is not a classifier, before anything is written).
    """
    import keras

    run_dir, out = Path(run_dir), Path(out)
    if not MODEL_NAME_PATTERN.match(out.name):
        raise ValueError(
            f"model name {out.name!r} (the last part of --out) must use letters, digits, '_', '.' and '-'"
        )
    if version is not None and version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version}")
    run = Run(run_dir)
    config = run.config
    task = run.task()
    options = task.check_options({**(options or {}), **({"lung_run": lung_run} if lung_run is not None else {})})
    if cam:
        check_cam_export(task)
    check_precision(precision)  # before anything is written
    class_names = run.class_names
    image_size = run.settings.image_size
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    version = next_version(out) if version is None else int(version)
    existing = _version_dirs(out, version)
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace it or pick another --version")
    fitted = None
    if calibration and getattr(task, "supports_calibration", False):
        from caaxr_tf.calibrate import read_calibration

        fitted = read_calibration(run, which)  # before anything is written
    model, options_metadata = task.serving_model(run.model(which), image_size, options, Run)
    if fitted is not None:
        from caaxr_tf.calibrate import calibrated_model

        # the export check then compares the served graph with the calibrated Keras model
        model = calibrated_model(model, fitted["temperature"])
        options_metadata = {**options_metadata, "calibration": {
            key: fitted[key] for key in ("method", "temperature", "checkpoint", "checkpoint_sha256", "fitted_on",
                                         "thresholds")}}
    temporary = out / f".export-{version}-{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    metadata = {
        "model": config.get("model"),
        "protocol": config.get("protocol"),
        "fold": config.get("fold"),
        "run_dir": str(run_dir.resolve()),
        "checkpoint": which,
        "keras": keras.__version__,
        "version": version,
        **options_metadata,
    }
    target = out / str(version)
    retired: list[tuple[Path, Path]] = []
    try:
        export_model(
            model, temporary, task=task, class_names=class_names, image_size=image_size,
            metadata=metadata, verify=verify, cam=cam, precision=precision,
        )
        from caaxr_tf.model_package import write_package  # the model card beside the SavedModel

        info = json.loads((temporary / METADATA_PATH).read_text(encoding="utf-8"))
        write_package(temporary, info, config, run_dir, name=out.name)
        for old in _version_dirs(out, version) if overwrite else []:
            retired.append((old, out / f".retired-{old.name}-{os.getpid()}.tmp"))
            os.rename(*retired[-1])
        try:
            os.rename(temporary, target)
        except OSError as error:  # another export took this version meanwhile
            for old, moved in retired:
                os.rename(moved, old)
            raise FileExistsError(f"{target} appeared during the export; nothing was replaced") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    for _, moved in retired:
        shutil.rmtree(moved, ignore_errors=True)
    write_models_config(out.parent, serving_root)
    return target


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m caaxr_tf.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run folder written by caaxr_tf.train")
    parser.add_argument("--out", required=True, help="saved_models/NAME: the model's TF Serving base path")
    parser.add_argument("--version", type=int, default=None, help="version number (default: the next free one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    parser.add_argument("--which", choices=("best", "final"), default="best", help="checkpoint to export")
    parser.add_argument(
        "--serving-root",
        default=None,
        help="absolute folder the server sees saved_models/ as, for models.config base paths "
        "(default: as the existing models.config, else the absolute local path)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the check of the reloaded export")
    parser.add_argument("--cam", action="store_true",
                        help="add the Grad-CAM output `cam` [N, S, S] of the predicted class (classifiers only)")
    parser.add_argument("--preset", default=None, metavar="DIR",
                        help="also write a KerasHub-style preset of the run (config.json, model.weights.h5, "
                             "metadata.json; caaxr_tf.models.preset.load_preset)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="serve the raw probabilities even when the run has a calibration.json")
    add_task_arguments(parser, "export")
    add_precision_argument(parser, "the served model")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        target = export_run(
            args.run, args.out, args.version, args.overwrite,
            which=args.which, serving_root=args.serving_root, verify=not args.no_verify, cam=args.cam,
            options=task_options(args), precision=args.precision, calibration=not args.no_calibration,
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.preset:
        from caaxr_tf.models.preset import save_run_preset

        print(f"wrote preset {save_run_preset(args.run, args.preset, which=args.which)}")
    print(f"exported {args.run} to {target}")
    print(f"updated {Path(args.out).parent / MODELS_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
