#!/usr/bin/env python
"""Write the synthetic CAAXR dataset (BIMCV, CAAXR CSVs, CheXpert) in the real layouts.

    python tools/make_synthetic.py --out DATA [--scale tiny|small|paper] [--seed 0] [--workers N]
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from caaxr_tf.data.synthetic import main
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from caaxr_tf.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
