#!/usr/bin/env python
"""Write the TFRecord shards of the CAAXR (or covid-chestxray) protocols.

    python tools/make_tfrecords.py --data-root DATA --out TFRECORDS [--protocol all]
        [--overwrite] [--verify]

A rerun with the same arguments and inputs skips finished protocols ("up to date") and
rewrites any shard that is missing or of the wrong size; --verify also reads every shard back
(CRCs, record counts, SHA-256 against summary.json) and rewrites the damaged ones. A protocol
folder built with other arguments or inputs is refused, naming what differs, unless
--overwrite. Exit status: 0 done, 2 error (one line on stderr, nothing half-written).
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


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder with bimcv/, caaxr/, chexpert/ (or the covid-chestxray folder)")
    parser.add_argument("--out", required=True, help="output folder; one sub-folder per protocol")
    parser.add_argument("--source", default="caaxr", choices=["caaxr", "covid-chestxray"])
    parser.add_argument("--protocol", default="all", choices=["all", "seg", "2class", "3class", "4class"])
    parser.add_argument("--folds", type=_int_at_least(1), default=None, help="number of folds (default: configs/protocols.yaml, 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=_int_at_least(1), default=os.cpu_count() or 1, help="decoding processes")
    parser.add_argument("--storage-size", type=_int_at_least(0), default=512,
                        help="longest side kept in the records; 0 keeps the original size")
    parser.add_argument("--records-per-shard", type=_int_at_least(1), default=256)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace protocols that --out holds from other arguments or inputs")
    parser.add_argument("--verify", action="store_true",
                        help="read every shard back (CRCs, record counts, SHA-256) and rewrite damaged ones")
    parser.add_argument("--set", dest="data_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override configs/data.yaml, e.g. --set chexpert.uncertain=positive")
    parser.add_argument("--set-protocol", dest="protocol_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override configs/protocols.yaml, e.g. --set-protocol caaxr.2class.classes.covid.count=100")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from caaxr_tf.data.tfrecords import WorkerDiedError, build_tfrecords
    from caaxr_tf.locks import FolderLockedError

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
            overwrite=args.overwrite,
            verify=args.verify,
        )
    except (SchemaError, OSError, ValueError, FolderLockedError, WorkerDiedError) as error:
        # OSError: e.g. a full disk while staging or writing (no file is left under a final name)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        tf = sys.modules.get("tensorflow")  # imported by the build, after its workers start
        if tf is None or not isinstance(error, tf.errors.OpError):
            raise
        print(f"error: {error.message}", file=sys.stderr)  # e.g. the shard writer on a full disk
        return 2
    elapsed = time.perf_counter() - started
    images = sum(sum(s["counts"]["total"].values()) for s in summaries.values())
    print(f"done: {len(summaries)} protocol(s), {images} records in total, {elapsed:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
