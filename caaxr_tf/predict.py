"""Predict with an exported model on PNG, JPEG and DICOM files.

    python -m caaxr_tf.predict --model saved_models/NAME[/N] [--overlay DIR] [--cam DIR]
        [--batch-size 16] [--bit-depth N] [--invert] [--no-sidecars] FILE_OR_DIR ...

Prints one JSON line per image, in input order, as soon as its batch is done: the predicted
class and the probability of every class for a classifier, the fraction of the image inside
the mask (probability >= 0.5) for a segmentation model (``--overlay DIR`` also writes the mask
over the image as a PNG). A file that cannot be read or predicted gives a line with
``"error"`` (repeated on stderr) and the others go on: that includes what is not a regular
file (a FIFO, socket or device is never opened; a broken symbolic link is named), an empty
file, an image over the pixel limit and a model output that is not finite. The exit status
is 1 if any file failed, 2 if nothing could be run.

A classifier exported with ``caaxr_tf.export --cam`` also gives ``cam_peak``: where the
Grad-CAM of the predicted class is largest, in pixels of the model's input (``x``, ``y``),
normalised to 0..1 (``x_norm``, ``y_norm``) and its value; ``--cam DIR`` writes one overlay
PNG per image (the CAM in jet colours over the model's input, the peak marked) and adds its
path as ``cam_overlay``. ``--cam`` with an export without the ``cam`` output, or with a CT
export, is an error, as is ``--overlay`` with an export whose task draws no overlay
(classification, CT, regression).

Inputs go through the export's ``serving_default`` signature, so they are preprocessed in the
graph exactly as in training:

* PNG/JPEG bytes are sent as they are. A BIMCV PNG with its DICOM-JSON sidecar beside it
  (same name, ``.json``) uses the sidecar's BitsStored and Presentation LUT Shape, as the
  TFRecords do; otherwise ``--bit-depth`` (significant bits of 16-bit PNGs) and ``--invert``
  apply.
* DICOM files are read with ``caaxr_tf.data.dicom.read_dicom`` (modality LUT, VOI window,
  MONOCHROME1 inversion) and sent as 16-bit PNGs with bit depth 16.

CT exports (the ``ct`` task) take raw slices (HU + 1024): a 16-bit TIFF or DICOM slice is
sent as a 16-bit PNG of its raw values, and a *folder* is a patient: its series (TIFF series
folders or DICOM series, ``caaxr_tf.data.ct_series``) go through slice selection, the kept
slices are classified and one JSON line gives the patient's verdicts under both thresholds,
the number of COVID slices and the kept slices (``caaxr_tf.ct.patients``; README "CT").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from caaxr_tf.logs import quiet_tensorflow_logs

quiet_tensorflow_logs()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caaxr_tf.data.formats import (  # noqa: E402
    DICOM_SUFFIXES,
    JPEG_SOI,
    PNG_SIGNATURE,
    check_complete,
    check_pixel_limit,
    check_regular_file,
    image_size,
    is_dicom,
)
from caaxr_tf.data.records import InputError  # noqa: E402
from caaxr_tf.export import (  # noqa: E402
    METADATA_PATH,
    PNG_BIT_DEPTH_OFFSET,
    PREPROCESSED_SIGNATURE,
    SERVING_SIGNATURE,
    list_versions,
)
from caaxr_tf.io import write_bytes_atomic  # noqa: E402
from caaxr_tf.tasks.ct import predict_patients  # noqa: E402,F401  (moved to the ct task; re-exported)
from caaxr_tf.data.bimcv import read_sidecar  # noqa: E402
from caaxr_tf.data.formats import TIFF_MAGIC  # noqa: E402
from caaxr_tf.data.pipeline import preprocess_image  # noqa: E402
from caaxr_tf.explain.overlay import cam_overlay_rgb, encode_png, peak_location  # noqa: E402
from caaxr_tf.tasks import get_task  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CAM_OUTPUT = "cam"  # the Grad-CAM output of ``caaxr_tf.export --cam``


@dataclass
class PreparedImage:
    """One file ready for ``serving_default``."""

    path: str
    encoded: bytes
    format: str  # png, jpeg or dicom
    invert: bool
    bit_depth: int


def resolve_model_dir(model_dir: str | Path) -> Path:
    """A version folder as given, or the highest version under a model's base path."""
    model_dir = Path(model_dir)
    if (model_dir / "saved_model.pb").exists():
        return model_dir
    versions = list_versions(model_dir)
    if versions:
        return model_dir / str(versions[-1])
    raise FileNotFoundError(f"{model_dir} holds no SavedModel (saved_model.pb) and no numbered version of one")


def find_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly, and the PNG, JPEG and DICOM files under folders (sorted).

    Nothing is opened here except suffix-less regular files (read for the DICOM preamble).
    Entries under a folder with an image suffix that are not regular files (broken symbolic
    links, FIFOs, sockets) are listed too, so that they are reported rather than dropped.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)  # a missing or non-regular file is reported when it is read
            continue
        for file in sorted((p for p in path.rglob("*") if not p.is_dir()), key=lambda p: p.as_posix()):
            suffix = file.suffix.lower()
            if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES:
                found.append(file)
            elif not suffix and file.is_file() and is_dicom(str(file)):
                found.append(file)
    return found


def prepare_image(
    path: str | Path, *, invert: bool = False, bit_depth: int = 0, sidecars: bool = True, ct: bool = False
) -> PreparedImage:
    """Read one file; raises ``InputError`` naming the file and the problem. ``ct``: a CT
    export's input (TIFF and DICOM slices as raw values, ``prepare_ct_slice``)."""
    path = str(path)
    check_regular_file(path, "file")  # before opening: a FIFO would block
    if ct:
        prepared = prepare_ct_slice(path)
        if prepared is not None:
            return prepared
    if is_dicom(path):
        from caaxr_tf.data.dicom import read_dicom

        pixels = read_dicom(path).pixels
        return PreparedImage(path, tf.io.encode_png(pixels[:, :, None]).numpy(), "dicom", False, 16)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise InputError(path, "file", f"cannot be read ({error.strerror or error})") from error
    if not data:
        raise InputError(path, "file", "file is empty (0 bytes)")
    if not data.startswith((PNG_SIGNATURE, JPEG_SOI)):
        raise InputError(path, "image", "not a PNG, JPEG or DICOM file (unknown signature)")
    check_complete(path, data)
    size = image_size(data)
    if size is not None:
        check_pixel_limit(path, *size)  # the serving graph would decode it whole
    is_png = data.startswith(PNG_SIGNATURE)
    file_depth = 16 if is_png and len(data) > PNG_BIT_DEPTH_OFFSET and data[PNG_BIT_DEPTH_OFFSET] == 16 else 8
    sidecar = Path(path).with_suffix(".json")
    if sidecars and is_png and sidecar.exists():
        tags = read_sidecar(sidecar)
        invert, bit_depth = tags.invert, tags.bit_depth or 0
    elif file_depth == 8:
        bit_depth = 0  # --bit-depth describes 16-bit PNGs
    return PreparedImage(path, data, "png" if is_png else "jpeg", bool(invert), int(bit_depth) or file_depth)


def prepare_ct_slice(path: str) -> PreparedImage | None:
    """A 16-bit TIFF or DICOM CT slice as a 16-bit PNG of raw values (HU + 1024), or None for
    other files (PNGs are sent as they are). OpenCV and pydicom are imported only here."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head in TIFF_MAGIC:
        from caaxr_tf.data.ct_series import read_ct_tiff

        pixels, kind = read_ct_tiff(path), "tiff"
    elif is_dicom(path):
        from caaxr_tf.data.ct_series import read_ct_dicom

        pixels, kind = read_ct_dicom(path), "dicom"
    else:
        return None
    return PreparedImage(path, tf.io.encode_png(pixels[:, :, None]).numpy(), kind, False, 16)


def error_message(error: BaseException) -> str:
    """The useful part of an error: TensorFlow's graph boilerplate and node names removed."""
    if isinstance(error, InputError):
        return f"{error.field}: {error.reason}"
    lines = [line.strip() for line in str(error).splitlines()]
    noise = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[")
    kept = [line for line in lines if line and not line.startswith(noise)]
    message = " ".join(kept) or type(error).__name__
    return message.split(" [Op:")[0]


class ServedModel:
    """An exported model loaded with ``tf.saved_model.load`` and called through its signature."""

    def __init__(self, model_dir: str | Path):
        self.path = resolve_model_dir(model_dir)
        self.package = self._package()
        self.loaded = tf.saved_model.load(str(self.path))
        self.signature = self.loaded.signatures[SERVING_SIGNATURE]
        self.outputs = set(self.signature.structured_outputs)
        spec = self.loaded.signatures[PREPROCESSED_SIGNATURE].structured_input_signature[1]["images"]
        self.image_size = int(spec.shape[1])
        self.task = self._task()
        self.has_cam = CAM_OUTPUT in self.outputs

    def _task(self):
        """The export's task (from its metadata; an export without metadata is recognised by its
        outputs), checked against the outputs."""
        metadata_path = self.path / METADATA_PATH
        metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.exists() else {}
        self.calibration = metadata.get("calibration")
        if not metadata and self.package:  # the model package alone describes the export
            metadata = {key: self.package[key] for key in ("task", "class_names")}
        name = metadata.get("task")
        if name is None:
            name = ("classification" if "probabilities" in self.outputs else "detection" if "num_detections"
                    in self.outputs else "segmentation" if "mask" in self.outputs else None)
        if name is None:
            raise ValueError(f"{self.path}: outputs {sorted(self.outputs)} have neither probabilities nor mask")
        ranges = {"target_ranges": metadata["target_ranges"]} if metadata.get("target_ranges") else {}
        task = get_task(name)(metadata.get("class_names") or [], target_names=metadata.get("target_names") or (),
                              **ranges)
        task.check_outputs(self.outputs)
        return task

    def _package(self) -> dict[str, Any] | None:
        """The export's model package (``caaxr_tf.model_package``), checked; None for an export
        without one. A missing or inconsistent package file is a ModelPackageError naming it."""
        from caaxr_tf.model_package import has_package, read_package

        return read_package(self.path) if has_package(self.path) else None

    def __call__(self, images: Sequence[PreparedImage]) -> dict[str, np.ndarray]:
        outputs = self.signature(
            images=tf.constant([image.encoded for image in images], tf.string),
            invert=tf.constant([image.invert for image in images], tf.bool),
            bit_depth=tf.constant([image.bit_depth for image in images], tf.int32),
        )
        return {key: value.numpy() for key, value in outputs.items()}

    def classify_raw(self, images: np.ndarray) -> np.ndarray:
        """CT exports: COVID flags (arg-max) of float32 raw slices ``[B, S, S, 1]``, through
        ``predict_preprocessed``."""
        outputs = self.loaded.signatures[PREPROCESSED_SIGNATURE](images=tf.constant(images, tf.float32))
        return np.argmax(outputs["probabilities"].numpy(), axis=1) == self.task.covid_index

    def preprocess(self, image: PreparedImage) -> np.ndarray:
        """The model's input for ``image``: uint8 [S, S] (for overlays)."""
        pixels = preprocess_image(tf.constant(image.encoded), image.bit_depth, image.invert, self.image_size)
        return pixels.numpy()[:, :, 0]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _record(model: ServedModel, image: PreparedImage, outputs: dict[str, np.ndarray], index: int) -> dict[str, Any]:
    """The task's fields, then every other output with at most two dimensions per image."""
    record: dict[str, Any] = {"file": image.path, **model.task.prediction_record(outputs, index)}
    if CAM_OUTPUT in outputs:
        record["cam_peak"] = peak_location(outputs[CAM_OUTPUT][index])
    for key in sorted(set(outputs) - set(model.task.reported_outputs) - {CAM_OUTPUT}):
        value = np.asarray(outputs[key][index])
        if value.ndim > 2:  # per-image maps or per-detection images
            continue
        if value.dtype.kind in "SOU":
            record[key] = [_text(v) for v in value.ravel()]
        else:
            record[key] = np.round(value.astype(np.float64), 6).tolist() if value.dtype.kind == "f" else value.tolist()
    if model.calibration and "probabilities" in outputs:
        record["decisions"] = operating_decisions(model.calibration["thresholds"], outputs, index)
    record["input"] = {"format": image.format, "invert": image.invert, "bit_depth": image.bit_depth}
    if model.package:
        record["model"] = {"name": model.package["name"], "decision": model.package["thresholds"]["rule"]}
    return record


def operating_decisions(thresholds: Mapping[str, Any], outputs: Mapping[str, np.ndarray], index: int
                        ) -> dict[str, bool]:
    """``{"<class> at 90% specificity": p >= threshold, ...}`` of one image, from the calibrated
    probability as served (not the rounded one printed) and the export's thresholds."""
    names = [_text(name) for name in outputs["class_names"][index]]
    probability = float(outputs["probabilities"][index][names.index(thresholds["class"])])
    return {f"{thresholds['class']} at {key.split('_', 1)[1]}% specificity": probability >= float(point["threshold"])
            for key, point in thresholds.items() if key.startswith("specificity_")}


def write_overlay(image: np.ndarray, path: Path) -> Path:
    """An RGB uint8 overlay (a task's ``overlay``) as a PNG, written atomically."""
    write_bytes_atomic(path, tf.io.encode_png(image).numpy())
    return path


def _overlay_path(overlay_dir: Path, source: str, taken: set[Path], kind: str = "overlay") -> Path:
    stem = Path(source).stem
    path, number = overlay_dir / f"{stem}_{kind}.png", 1
    while path in taken:
        number += 1
        path = overlay_dir / f"{stem}_{kind}-{number}.png"
    taken.add(path)
    return path


def write_cam_overlay(pixels: np.ndarray, cam: np.ndarray, path: Path) -> Path:
    """The CAM over the model's input (uint8 [S, S]) as a PNG, written atomically (numpy
    drawing and ``tf.io.encode_png``: no OpenCV on the reading side)."""
    write_bytes_atomic(path, encode_png(cam_overlay_rgb(pixels, cam)))
    return path


def iter_predictions(
    model_dir: str | Path,
    paths: Iterable[str | Path],
    overlay_dir: str | Path | None = None,
    *,
    batch_size: int = 16,
    invert: bool = False,
    bit_depth: int = 0,
    sidecars: bool = True,
    model: ServedModel | None = None,
    cam_dir: str | Path | None = None,
) -> Iterator[dict[str, Any]]:
    """An iterator over one result dict per input file, in order, batch by batch as each is
    predicted (arguments are checked and the model loaded at the call).

    Files are read only when their batch comes, so results start before every input has
    been read, and a slow or odd input holds up its own batch only. Failures are
    ``{"file", "error"}`` dicts. Arguments as for ``predict_files``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    model = model or ServedModel(model_dir)
    if cam_dir is not None and model.task.no_cam_overlays:
        raise ValueError(f"--cam: a {model.task.name!r} export gets no CAM overlays ({model.task.no_cam_overlays}); "
                         "run without --cam")
    if overlay_dir is not None and not model.task.has_overlay:
        raise ValueError(f"--overlay: a {model.task.name!r} export has no overlay (segmentation, detection "
                         "and infection exports have); run without --overlay")
    if cam_dir is not None and not model.has_cam:
        raise ValueError(f"{model.path} has no `cam` output: export the classifier with caaxr_tf.export --cam")
    overlay_dir = Path(overlay_dir) if overlay_dir is not None else None
    options = dict(invert=invert, bit_depth=bit_depth, sidecars=sidecars)
    own = model.task.predict_inputs(
        model, list(paths), lambda files, **extra: _stream(model, files, overlay_dir, batch_size, {**options, **extra}),
        batch_size)
    if own is not None:  # the task's own inputs (CT: patient folders)
        return own
    files = find_inputs(paths)
    return _stream(model, files, overlay_dir, batch_size, options,
                   Path(cam_dir) if cam_dir is not None else None)


def _stream(model: ServedModel, files: list[Path], overlay_dir: Path | None, batch_size: int,
            options: dict[str, Any], cam_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    taken: set[Path] = set()
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        results: list[dict[str, Any] | None] = [None] * len(batch)
        ready: list[tuple[int, PreparedImage]] = []
        for position, file in enumerate(batch):
            try:
                ready.append((position, prepare_image(file, **options)))
            except (InputError, OSError) as error:
                results[position] = {"file": str(file), "error": error_message(error)}
        per_image = _predict_batch(model, ready, results)
        for position, image in ready:
            if position in per_image and cam_dir is not None:
                target = _overlay_path(cam_dir, image.path, taken, "cam")
                try:
                    results[position]["cam_overlay"] = str(
                        write_cam_overlay(model.preprocess(image), per_image[position][CAM_OUTPUT], target))
                except OSError as error:
                    results[position]["error"] = f"CAM overlay not written: {error}"
            if position not in per_image or overlay_dir is None:
                continue
            picture = model.task.overlay(model.preprocess(image), per_image[position])
            if picture is None:
                continue
            target = _overlay_path(overlay_dir, image.path, taken)
            try:
                results[position]["overlay"] = str(write_overlay(picture, target))
            except OSError as error:
                results[position]["error"] = f"overlay not written: {error}"
        yield from (record for record in results if record is not None)


def _predict_batch(
    model: ServedModel, items: list[tuple[int, PreparedImage]], results: list[dict[str, Any] | None]
) -> dict[int, np.ndarray]:
    """Fill ``results`` for ``items``; a failing batch is retried image by image to find the
    file(s) at fault. Returns each predicted image's outputs by position (for overlays)."""
    masks: dict[int, dict[str, np.ndarray]] = {}
    if not items:
        return masks
    try:
        outputs = model([image for _, image in items])
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
        if len(items) > 1:
            for item in items:
                masks.update(_predict_batch(model, [item], results))
            return masks
        position, image = items[0]
        results[position] = {"file": image.path, "error": error_message(error)}
        return masks
    for index, (position, image) in enumerate(items):
        bad = sorted(key for key, value in outputs.items()
                     if value.dtype.kind == "f" and not np.all(np.isfinite(value[index])))
        if bad:
            results[position] = {"file": image.path, "error": f"model output {', '.join(bad)} is not finite "
                                 f"(NaN or Inf): the model is broken (e.g. trained with a non-finite loss)"}
            continue
        results[position] = _record(model, image, outputs, index)
        masks[position] = {key: value[index] for key, value in outputs.items()}
    return masks


def predict_files(
    model_dir: str | Path,
    paths: Iterable[str | Path],
    overlay_dir: str | Path | None = None,
    *,
    batch_size: int = 16,
    invert: bool = False,
    bit_depth: int = 0,
    sidecars: bool = True,
    model: ServedModel | None = None,
    cam_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """One result dict per input file, in order; failures are ``{"file", "error"}`` dicts.

    ``paths`` may name files and folders (searched recursively for PNG, JPEG and DICOM).
    ``overlay_dir`` writes mask overlays for segmentation models. ``model`` reuses an
    already loaded ``ServedModel`` instead of loading ``model_dir``. ``cam_dir`` writes CAM
    overlays (an export with the ``cam`` output, else ``ValueError``). ``iter_predictions``
    yields the same dicts batch by batch.
    """
    return list(iter_predictions(model_dir, paths, overlay_dir, batch_size=batch_size, invert=invert,
                                 bit_depth=bit_depth, sidecars=sidecars, model=model, cam_dir=cam_dir))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m caaxr_tf.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    parser.add_argument(
        "--model", required=True, help="saved_models/NAME/N, or saved_models/NAME for its latest version"
    )
    parser.add_argument("--overlay", default=None, metavar="DIR", help="write mask overlays (segmentation models)")
    parser.add_argument("--cam", default=None, metavar="DIR",
                        help="write Grad-CAM overlays (a classifier exported with caaxr_tf.export --cam)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--bit-depth", type=int, default=0, help="significant bits of 16-bit PNGs without a sidecar (0: 16)"
    )
    parser.add_argument("--invert", action="store_true", help="invert PNG/JPEG inputs without a sidecar")
    parser.add_argument("--no-sidecars", action="store_true", help="ignore BIMCV DICOM-JSON sidecars beside PNGs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 <= args.bit_depth <= 16:
        print(f"error: --bit-depth must be 0..16, got {args.bit_depth}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        model = ServedModel(args.model)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: cannot load the model {args.model}: {error_message(error)}", file=sys.stderr)
        return 2
    try:
        results = iter_predictions(
            model.path, args.inputs, args.overlay, batch_size=args.batch_size, invert=args.invert,
            bit_depth=args.bit_depth, sidecars=not args.no_sidecars, model=model, cam_dir=args.cam,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    count = failed = 0
    for record in results:  # printed as each batch finishes
        count += 1
        print(json.dumps(record), flush=True)
        if "error" in record:
            failed += 1
            print(f"error: {record['file']}: {record['error']}", file=sys.stderr, flush=True)
    if not count:
        print("error: no PNG, JPEG or DICOM files found in " + ", ".join(args.inputs), file=sys.stderr)
        return 2
    if failed:
        print(f"{failed} of {count} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
