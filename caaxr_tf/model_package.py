"""The self-describing model package written beside an exported SavedModel.

``<export>/assets.extra/package/`` holds

* ``model_card.json``: machine-readable: the input spec (shape, channels, bit-depth rules,
  value range, inversion), class names and decision thresholds, preprocessing, training data
  and protocol, the evaluation table where the run has one, weights provenance (with the
  ``caaxr import-weights`` contract and checksum when imported), intended use and limits, and
  the SHA-256 of the SavedModel files it describes;
* ``model_card.md``: the same for people.

`read_package` checks both files exist, parse, carry every required field, agree with each
other and with the SavedModel files (checksums): any problem is a `ModelPackageError` naming
the file. ``caaxr predict`` reads the package (class names, thresholds, input rules) when an
export has one, so an export folder alone is enough to predict.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

PACKAGE_DIR = "assets.extra/package"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
PACKAGE_FORMAT = "caaxr-model-package/1"
REQUIRED = ("format", "name", "task", "class_names", "thresholds", "input", "preprocessing", "training",
            "evaluation", "weights", "intended_use", "limitations", "files")

INTENDED_USE = (
    "Research and benchmarking of COVID-19 chest imaging methods (the CAAXR protocols). "
    "Not a medical device: not for diagnosis, triage or any clinical decision."
)
LIMITATIONS = [
    "Trained and evaluated on small public collections with source and acquisition biases "
    "(different hospitals per class, paediatric controls, annotated figures from papers); scores "
    "may reflect the source rather than the disease.",
    "Calibrated only on the training protocol's data; thresholds do not transfer to other populations.",
    "Expects frontal chest radiographs (or the CT slices of its protocol) in the input spec below; "
    "other views, modalities or post-processed images are out of scope.",
]


class ModelPackageError(ValueError):
    """A model package file is missing, unreadable or inconsistent."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(export_dir: Path) -> dict[str, str]:
    """SHA-256 of the SavedModel graph and variables (what the package describes)."""
    files = [export_dir / "saved_model.pb", *sorted((export_dir / "variables").glob("*"))]
    return {str(p.relative_to(export_dir)): _sha256(p) for p in files if p.is_file()}


def input_spec(image_size: int, channels: int = 1) -> dict[str, Any]:
    return {
        "shape": [image_size, image_size, channels],
        "channels": "grey (one channel); RGB files are converted to grey",
        "formats": ["PNG (8 or 16 bit)", "JPEG (8 bit)", "DICOM (via caaxr predict)"],
        "bit_depth": "the serving signature takes the file bytes and `bit_depth`: values are read as 16 bit "
                     "(8-bit data times 257); bit_depth 9..15 (e.g. 12-bit BIMCV) sets the range to 2**bit_depth - 1, "
                     "anything else to 65535; the range is scaled to 0..255 (uint8)",
        "value_range": [0, 255],
        "inversion": "`invert` true for MONOCHROME1 (white = air) images: v becomes range - v before scaling; "
                     "caaxr predict sets it from DICOM PhotometricInterpretation, sidecars and --invert",
        "resize": f"antialiased bicubic to {image_size}x{image_size} on the raw values, aspect ratio not kept",
    }


def _preprocessing(run_config: Mapping[str, Any], imported: Mapping[str, Any] | None) -> dict[str, Any]:
    if imported:
        return {"inside_model": True, **{k: imported["preprocessing"][k] for k in ("name", "description", "mean", "std")}}
    model = str(run_config.get("model") or "")
    mode = {"densenet121": "torch", "resnet18": "torch", "mobilenetv2": "tf", "vgg19": "caffe"}.get(model)
    if mode:
        return {"inside_model": True, "name": f"imagenet-{mode}",
                "description": f"GrayscaleToRGB then keras.applications preprocess_input mode {mode!r}"}
    return {"inside_model": True, "name": "model-specific", "description": "raw 0..255 pixels into the model"}


def _evaluation(run_dir: Path | None) -> list[dict[str, Any]]:
    if run_dir is None:
        return []
    table = []
    for path in sorted((run_dir / "eval").glob("metrics*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        table.append({"file": path.name, "metrics": data})
    return table


def _thresholds(task: str, info: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The decision rule of the export and, when it was calibrated, its operating points."""
    calibration = info.get("calibration")
    if calibration:
        points = calibration["thresholds"]
        return {"rule": f"arg-max of the temperature-scaled probabilities (T = {calibration['temperature']:.4g}); "
                        f"operating points for {points['class']}: {points['rule']}",
                "values": {key: value for key, value in points.items() if key.startswith("specificity_")}}
    return {"rule": "arg-max of the softmax probabilities" if task == "classification"
            else "probability >= 0.5 per pixel" if task in ("segmentation", "infection")
            else "task-specific", "values": run_config.get("thresholds")}


def build_card(export_dir: Path, info: Mapping[str, Any], run_config: Mapping[str, Any] | None = None,
               run_dir: Path | None = None, name: str | None = None) -> dict[str, Any]:
    """The ``model_card.json`` content of an export (``info``: its ``caaxr_export.json``)."""
    run_config = dict(run_config or {})
    weights = str(run_config.get("weights") or "none")
    imported = None
    if weights not in ("none", "imagenet"):
        from caaxr_tf.weights.convert import read_sidecar

        try:
            imported = read_sidecar(weights)
        except (OSError, ValueError):
            imported = None
    class_names = list(info.get("class_names") or [])
    task = str(info.get("task"))
    image_size = int(info.get("image_size", 224))
    return {
        "format": PACKAGE_FORMAT,
        "name": name or str(run_config.get("model") or info.get("model") or "model"),
        "task": task,
        "class_names": class_names,
        "thresholds": _thresholds(task, info, run_config),
        "input": input_spec(image_size),
        "preprocessing": _preprocessing(run_config, imported),
        "training": {k: run_config.get(k) for k in ("protocol", "fold", "tfrecords", "epochs", "batch_size",
                                                    "learning_rate", "seed", "class_balance", "loss", "monitor")
                     if k in run_config},
        "evaluation": _evaluation(run_dir),
        "weights": {"initialisation": weights if weights in ("none", "imagenet") else "file",
                    "file": None if weights in ("none", "imagenet") else weights,
                    "backbone_frozen": weights != "none",
                    "imported": imported},
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "files": model_files(export_dir),
        "exported_at": info.get("exported_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "serving": info.get("signatures"),
    }


def render_markdown(card: Mapping[str, Any]) -> str:
    lines = [f"# Model card: {card['name']}", "", f"Task: **{card['task']}**. Package format `{card['format']}`.", "",
             "## Intended use", "", card["intended_use"], "", "## Limitations", ""]
    lines += [f"* {item}" for item in card["limitations"]]
    lines += ["", "## Input", ""] + [f"* **{k}**: {v}" for k, v in card["input"].items()]
    lines += ["", "## Classes and thresholds", "", f"Classes: {', '.join(card['class_names']) or '(none)'}",
              f"Decision rule: {card['thresholds']['rule']}", "", "## Preprocessing", "",
              f"{card['preprocessing']['name']}: {card['preprocessing']['description']} (inside the model)",
              "", "## Training", ""]
    lines += [f"* {k}: {v}" for k, v in card["training"].items()] or ["(unknown)"]
    lines += ["", "## Evaluation", ""]
    if card["evaluation"]:
        for entry in card["evaluation"]:
            metrics = entry["metrics"]
            flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} if isinstance(metrics, dict) else {}
            lines += [f"### {entry['file']}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" for k, v in flat.items()] + [""]
    else:
        lines += ["No evaluation table in the run folder at export time (run `caaxr evaluate` before exporting)."]
    weights = card["weights"]
    lines += ["", "## Weights provenance", "", f"* initialisation: {weights['initialisation']}"]
    if weights.get("imported"):
        imp = weights["imported"]
        lines += [f"* imported from {imp['source']} checkpoint `{imp['checkpoint']}` (sha256 {imp.get('checkpoint_sha256')})",
                  f"* source preprocessing: {imp['preprocessing']['description']}"]
    lines += [f"* backbone frozen: {weights['backbone_frozen']}", "", "## Files", ""]
    lines += [f"* `{k}` sha256 `{v}`" for k, v in card["files"].items()]
    return "\n".join(lines) + "\n"


def write_package(export_dir: str | Path, info: Mapping[str, Any], run_config: Mapping[str, Any] | None = None,
                  run_dir: str | Path | None = None, name: str | None = None) -> Path:
    """Write ``assets.extra/package/model_card.{json,md}`` into ``export_dir``; returns the folder."""
    export_dir = Path(export_dir)
    card = build_card(export_dir, info, run_config, Path(run_dir) if run_dir else None, name)
    folder = export_dir / PACKAGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / CARD_MD).write_text(render_markdown(card), encoding="utf-8")
    return folder


def has_package(export_dir: str | Path) -> bool:
    folder = Path(export_dir) / PACKAGE_DIR
    return folder.is_dir()


def read_package(export_dir: str | Path, *, check_files: bool = True) -> dict[str, Any]:
    """The checked ``model_card.json`` of ``export_dir``; `ModelPackageError` naming the bad file."""
    export_dir = Path(export_dir)
    folder = export_dir / PACKAGE_DIR
    card_path, md_path = folder / CARD_JSON, folder / CARD_MD
    for path in (card_path, md_path):
        if not path.is_file():
            raise ModelPackageError(f"model package incomplete: {path} is missing")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ModelPackageError(f"{card_path}: not valid JSON ({error})") from None
    if not isinstance(card, dict):
        raise ModelPackageError(f"{card_path}: expected a JSON object")
    missing = [key for key in REQUIRED if key not in card]
    if missing:
        raise ModelPackageError(f"{card_path}: missing {', '.join(missing)}")
    if card["format"] != PACKAGE_FORMAT:
        raise ModelPackageError(f"{card_path}: format {card['format']!r}, expected {PACKAGE_FORMAT!r}")
    if f"# Model card: {card['name']}" not in md_path.read_text(encoding="utf-8"):
        raise ModelPackageError(f"{md_path}: does not describe model {card['name']!r} of {card_path}")
    metadata_path = export_dir / "assets.extra" / "caaxr_export.json"
    if metadata_path.is_file():
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
        for key in ("task", "class_names"):
            if key in metadata and metadata[key] != card[key]:
                raise ModelPackageError(
                    f"{card_path}: {key} {card[key]!r} disagrees with {metadata_path} ({metadata[key]!r})")
    if check_files:
        for relative, digest in card["files"].items():
            path = export_dir / relative
            if not path.is_file():
                raise ModelPackageError(f"{card_path}: describes {path}, which is missing")
            if _sha256(path) != digest:
                raise ModelPackageError(f"{card_path}: {path} has changed since the package was written "
                                        "(checksum differs): the package describes another model")
    return card
