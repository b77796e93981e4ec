#!/usr/bin/env python
"""Write a synthetic QaTa-COV19 tree (COVID-19 images with infection masks, controls, bad files).

    python tools/make_synthetic_qata.py --out DATA/qata [--scale tiny|small] [--seed 0] [--workers N]
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from caaxr_tf.data.synthetic_qata import main
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from caaxr_tf.data.synthetic_qata import main

if __name__ == "__main__":
    sys.exit(main())
