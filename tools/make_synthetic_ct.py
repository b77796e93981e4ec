#!/usr/bin/env python
"""Write the synthetic COVID-CTset (16-bit TIFF CT series, all.csv) in the real layout.

    python tools/make_synthetic_ct.py --out DATA/covid-ctset [--scale tiny|small] [--seed 0] [--workers N]
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from caaxr_tf.data.synthetic_ct import main
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from caaxr_tf.data.synthetic_ct import main

if __name__ == "__main__":
    sys.exit(main())
