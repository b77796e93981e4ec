#!/usr/bin/env python
"""Throughput and latency of caaxr-tf against reference implementations: see benchmarks.benchmark.

    python tools/benchmark.py {pipeline,tfrecords,train,inference,ct,all} [options] --json OUT.json

The benchmarks live in the checkout's top-level ``benchmarks/`` package (not installed with
caaxr_tf); this script puts the checkout on ``sys.path`` so it runs from any folder.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
