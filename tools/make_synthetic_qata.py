#!/usr/bin/env python
"""Write a synthetic QaTa-COV19 tree: ``caaxr-make-synthetic --layout qata``.

    python tools/make_synthetic_qata.py --out DATA/qata [--scale tiny|small] [--seed 0] [--workers N]
"""

from __future__ import annotations

import sys

from caaxr_tf.data.synthetic_qata import main

if __name__ == "__main__":
    sys.exit(main())
