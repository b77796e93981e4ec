"""``caaxr <verb> ...``: one command for every entry point of the package.

    caaxr --help                      # the verbs, one line each (imports no TensorFlow)
    caaxr train --protocol seg --model unet --tfrecords TFRECORDS --out runs/unet-f1
    caaxr <verb> --help               # that verb's own options

Each verb is an existing ``main(argv)`` (``caaxr_tf.train:main`` for ``train``, ...), imported
only when it is run, so ``caaxr --help`` is fast. The older console scripts (``caaxr-train``,
``caaxr-make-tfrecords``, ...) are aliases of their verb here; ``python -m caaxr_tf.<module>``
runs the module's ``main`` directly, as before.

The runner sets the one default of ``TF_CPP_MIN_LOG_LEVEL`` (``caaxr_tf.logs``) before it imports
a verb, and applies one error policy to what a verb's ``main`` lets escape: a user error (the
package's error classes for bad settings and bad inputs, see ``USAGE_ERRORS`` and
``FAILURE_ERRORS``, and a missing file) prints ``error: <message>`` on stderr, without a
traceback, and exits 2 for a usage error (a setting or name that cannot be used) or 1 for a
failure (bad input data, a locked folder, a missing file). Anything else keeps its traceback.
A verb's own return code (most ``main`` functions print their errors and return 1 or 2) is the
exit code, unchanged.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable, NamedTuple, Sequence

from caaxr_tf.logs import quiet_tensorflow_logs

PROG = "caaxr"


class Verb(NamedTuple):
    module: str  # its ``main(argv)`` is the verb
    summary: str  # one line for ``caaxr --help``


VERBS: dict[str, Verb] = {
    "make-synthetic": Verb("caaxr_tf.data.synthetic",
                           "write a synthetic data set in a real layout (--layout caaxr, qata or ct)"),
    "make-synthetic-qata": Verb("caaxr_tf.data.synthetic_qata", "make-synthetic --layout qata (QaTa-COV19 tree)"),
    "make-synthetic-ct": Verb("caaxr_tf.data.synthetic_ct", "make-synthetic --layout ct (COVID-CTset tree)"),
    "make-tfrecords": Verb("caaxr_tf.data.tfrecords",
                           "build the TFRecord shards of every protocol and fold of a source set"),
    "train": Verb("caaxr_tf.train", "train one model on one protocol and fold (a run folder)"),
    "evaluate": Verb("caaxr_tf.evaluate", "evaluate a trained run on its test (or validation) split"),
    "score": Verb("caaxr_tf.scoring", "score a predictions file against a protocol, with bootstrap intervals"),
    "compare": Verb("caaxr_tf.compare", "compare two runs (or prediction files) on the same images: DeLong, bootstrap"),
    "calibrate": Verb("caaxr_tf.calibrate",
                      "fit a classifier run's temperature and operating thresholds on its validation split"),
    "cv": Verb("caaxr_tf.cv", "cross-validation: train and evaluate models on every fold of a protocol"),
    "export": Verb("caaxr_tf.export", "export a trained run as a TensorFlow Serving SavedModel"),
    "predict": Verb("caaxr_tf.predict", "predict with an exported model on PNG, JPEG and DICOM files"),
    "demo": Verb("caaxr_tf.demo", "the end-to-end demo of make demo (synthetic data to served model)"),
    "infection-cam": Verb("caaxr_tf.infection.cam",
                          "infection maps against a classifier's activation maps, scored alike"),
    "severity-protocol": Verb("caaxr_tf.severity.protocol",
                              "the published severity evaluation (least squares per grouped half split)"),
    "severity-features": Verb("caaxr_tf.severity.run_features",
                              "severity regression on features of this project's trained runs"),
    "import-weights": Verb("caaxr_tf.weights.cli",
                           "convert a torchxrayvision/timm/torchvision checkpoint into a Keras backbone (--weights)"),
    "ct-select": Verb("caaxr_tf.ct.select", "select the open-lung slices of CT series (JSON lines)"),
    "ct-report": Verb("caaxr_tf.ct.report", "per-fold and mean tables of CT runs, per slice and per patient"),
}

# (module, class) of the package's user errors, resolved only when an exception reaches the
# runner (so importing them costs nothing on the way in). Usage: a setting, name or option value
# that cannot be used, found before the work. Failures: the inputs or the environment.
USAGE_ERRORS = (
    ("caaxr_tf.config", "ConfigError"),
    ("caaxr_tf.tasks.base", "UnknownTaskError"),
    ("caaxr_tf.data.sources", "UnknownSourceError"),
    ("caaxr_tf.explain.cross_source", "ClassMatchError"),
    ("caaxr_tf.weights.convert", "WeightConversionError"),
)
FAILURE_ERRORS = (
    ("caaxr_tf.data.records", "InputError"),  # and SchemaError
    ("caaxr_tf.data.tfrecords", "OutputConflictError"),
    ("caaxr_tf.locks", "FolderLockedError"),
    ("caaxr_tf.models.weights", "WeightsUnavailableError"),
    ("caaxr_tf.training.callbacks", "NonFiniteLossError"),
    ("caaxr_tf.weights.state_dict", "StateDictError"),
    ("caaxr_tf.model_package", "ModelPackageError"),
    ("caaxr_tf.scoring", "PredictionsError"),
    ("caaxr_tf.calibrate", "CalibrationError"),
    ("builtins", "FileNotFoundError"),
)


def help_text() -> str:
    width = max(map(len, VERBS))
    lines = [f"usage: {PROG} <verb> [options]    ({PROG} <verb> --help: the verb's options)", "",
             "CAAXR COVID-19 chest imaging benchmarks in TensorFlow 2 / Keras 3.", "", "verbs:"]
    lines += [f"  {name:<{width}}  {verb.summary}" for name, verb in VERBS.items()]
    lines += ["", "Also: python -m caaxr_tf.<module> (e.g. python -m caaxr_tf.train) runs the same main."]
    return "\n".join(lines) + "\n"


def _loaded_class(module: str, name: str) -> type | None:
    """The class if its module is already imported (an exception of it can only come from there)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def exit_code_for(error: BaseException) -> int | None:
    """2 for a usage error, 1 for a failure, None for anything else (an unexpected exception)."""
    for classes, code in ((USAGE_ERRORS, 2), (FAILURE_ERRORS, 1)):
        for module, name in classes:
            cls = _loaded_class(module, name)
            if isinstance(cls, type) and isinstance(error, cls):
                return code
    return None


def load_verb(name: str) -> Callable[[Sequence[str] | None], int | None]:
    """The ``main`` of verb ``name`` (imports its module, and so TensorFlow where it needs it)."""
    quiet_tensorflow_logs()
    return importlib.import_module(VERBS[name].module).main


def run(name: str, argv: Sequence[str], prog: str | None = None) -> int:
    """Run verb ``name`` with ``argv`` under the runner's error policy; its exit code."""
    prog = prog or f"{PROG} {name}"
    saved = sys.argv[0] if sys.argv else None
    try:
        main = load_verb(name)
        if sys.argv:
            sys.argv[0] = prog  # argparse's default prog: "caaxr train" in usage lines
        try:
            code = main(list(argv))
        except Exception as error:
            code = exit_code_for(error)
            if code is None:
                raise
            message = getattr(error, "message", None) or str(error) or type(error).__name__
            print(f"error: {message}", file=sys.stderr)
        return int(code or 0)
    finally:
        if saved is not None:
            sys.argv[0] = saved


def main(argv: Sequence[str] | None = None) -> int:
    """``caaxr``: ``--help`` lists the verbs; ``caaxr <verb> ARGS`` runs the verb's ``main(ARGS)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(help_text())
        return 2
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help", "help"):
        if first == "help" and rest:  # caaxr help train == caaxr train --help
            return main([rest[0], "--help"])
        sys.stdout.write(help_text())
        return 0
    if first == "--version":
        from caaxr_tf import __version__

        print(f"{PROG} {__version__}")
        return 0
    if first not in VERBS:
        close = difflib.get_close_matches(first, VERBS, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; verbs: {', '.join(VERBS)}"
        print(f"{PROG}: error: unknown verb {first!r}{hint}", file=sys.stderr)
        return 2
    return run(first, rest)


def _alias(verb: str) -> Callable[[], int]:
    def entry() -> int:
        return run(verb, sys.argv[1:], prog=f"caaxr-{verb}")

    entry.__name__ = entry.__qualname__ = verb.replace("-", "_")
    entry.__doc__ = f"``caaxr-{verb}``: the console-script alias of ``caaxr {verb}``."
    return entry


# The older console scripts (setup.cfg), each the same as its verb.
make_tfrecords = _alias("make-tfrecords")
make_synthetic = _alias("make-synthetic")
make_synthetic_qata = _alias("make-synthetic-qata")
train = _alias("train")
evaluate = _alias("evaluate")
cv = _alias("cv")
export = _alias("export")
predict = _alias("predict")
demo = _alias("demo")

if __name__ == "__main__":
    sys.exit(main())
