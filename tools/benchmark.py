#!/usr/bin/env python
"""Throughput and latency of caaxr-tf against reference implementations: see caaxr_tf.benchmark.

    python tools/benchmark.py {pipeline,tfrecords,train,inference,all} [options] --json OUT.json
"""

import sys

from caaxr_tf.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
