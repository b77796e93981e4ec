#!/usr/bin/env python
"""Write a synthetic COVID-CTset: ``caaxr-make-synthetic --layout ct``.

    python tools/make_synthetic_ct.py --out DATA/covid-ctset [--scale tiny|small] [--seed 0] [--workers N]
"""

from __future__ import annotations

import sys

from caaxr_tf.data.synthetic_ct import main

if __name__ == "__main__":
    sys.exit(main())
