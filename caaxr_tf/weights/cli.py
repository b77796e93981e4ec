"""``caaxr import-weights``: convert a PyTorch checkpoint into this project's Keras backbone.

    caaxr import-weights --from torchxrayvision densenet121-res224-all.pt --trust-pickle \\
        --model densenet121 --out weights/xrv-all.weights.h5
    caaxr train ... --model densenet121 --weights weights/xrv-all.weights.h5

Writes ``OUT.weights.h5`` (the backbone, for ``--weights``), ``OUT.import.json`` (source,
architecture, preprocessing contract, class names and operating points, checksum) and
``OUT.head.npz`` (the source's linear head). With ``--check`` the whole imported network
(``ImportedWeights.build_source_model``) is also saved as ``OUT.keras`` for inspection.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from caaxr_tf.weights.convert import MODELS, SOURCES, UNSUPPORTED


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="caaxr import-weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="where the checkpoint comes from")
    parser.add_argument("checkpoint", help=".safetensors (no torch needed), .npz, or .pt/.pth (needs torch)")
    parser.add_argument("--model", default="densenet121", choices=MODELS + tuple(UNSUPPORTED),
                        help="Keras network to map onto (densenet/resnet: any depth, for reduced networks)")
    parser.add_argument("--out", required=True, help="OUT.weights.h5")
    parser.add_argument("--input-size", type=int, default=224, help="input size the source was trained at")
    parser.add_argument("--class-names", default=None, help="JSON list (or a .json file) naming the head's outputs")
    parser.add_argument("--thresholds", default=None,
                        help="JSON list (or .json file) of torchxrayvision operating points (op_threshs)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling a whole saved model (torchxrayvision downloads); runs code from the file")
    parser.add_argument("--save-keras", action="store_true", help="also write OUT.keras, the whole imported network")
    return parser.parse_args(argv)


def _json_list(value: str | None) -> list | None:
    if value is None:
        return None
    text = Path(value).read_text(encoding="utf-8") if value.endswith(".json") else value
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON list, got {type(data).__name__}: {value}")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from caaxr_tf.weights.convert import WeightConversionError, import_weights
    from caaxr_tf.weights.state_dict import StateDictError

    try:
        imported = import_weights(
            args.source, args.checkpoint, args.model, input_size=args.input_size,
            class_names=_json_list(args.class_names), thresholds=_json_list(args.thresholds),
            trusted=args.trust_pickle,
        )
        out = imported.save(args.out)
    except (WeightConversionError, StateDictError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.save_keras:
        keras_path = out.with_name(out.name[: -len(".weights.h5")] + ".keras")
        imported.build_source_model().save(str(keras_path))
        print(f"wrote {keras_path}")
    meta = imported.metadata
    print(f"imported {args.checkpoint} ({args.source}, {meta['architecture']['family']} "
          f"{meta['architecture']['blocks']}) -> {out}")
    print(f"preprocessing: {meta['preprocessing']['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
