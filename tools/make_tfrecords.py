#!/usr/bin/env python
"""Write the TFRecord shards of the CAAXR (or covid-chestxray) protocols.

    python tools/make_tfrecords.py --data-root DATA --out TFRECORDS [--protocol all]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from caaxr_tf.data.records import SchemaError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder with bimcv/, caaxr/, chexpert/ (or the covid-chestxray folder)")
    parser.add_argument("--out", required=True, help="output folder; one sub-folder per protocol")
    parser.add_argument("--source", default="caaxr", choices=["caaxr", "covid-chestxray"])
    parser.add_argument("--protocol", default="all", choices=["all", "seg", "2class", "3class", "4class"])
    parser.add_argument("--folds", type=int, default=None, help="number of folds (default: configs/protocols.yaml, 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    parser.add_argument("--storage-size", type=int, default=512, help="longest side kept in the records; 0 keeps the original size")
    parser.add_argument("--records-per-shard", type=int, default=256)
    parser.add_argument("--set", dest="data_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override configs/data.yaml, e.g. --set chexpert.uncertain=positive")
    parser.add_argument("--set-protocol", dest="protocol_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override configs/protocols.yaml, e.g. --set-protocol caaxr.2class.classes.covid.count=100")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from caaxr_tf.data.tfrecords import build_tfrecords

    started = time.perf_counter()
    try:
        summaries = build_tfrecords(
            args.data_root,
            args.out,
            source=args.source,
            protocols=args.protocol,
            folds=args.folds,
            seed=args.seed,
            workers=args.workers,
            storage_size=args.storage_size,
            records_per_shard=args.records_per_shard,
            data_overrides=args.data_overrides,
            protocol_overrides=args.protocol_overrides,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except (SchemaError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    images = sum(sum(s["counts"]["total"].values()) for s in summaries.values())
    print(f"done: {len(summaries)} protocol(s), {images} records in total, {elapsed:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
