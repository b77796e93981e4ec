#!/usr/bin/env python
"""Write a synthetic data set in a real layout: ``caaxr-make-synthetic``.

    python tools/make_synthetic.py --out DATA [--layout caaxr|qata|ct] [--scale tiny|small|paper]
        [--seed 0] [--workers N]

The command lives in ``caaxr_tf.data.synthetic`` (``main``); see ``--help``. It needs the
package installed (``make install``: an editable install of this checkout).
"""

from __future__ import annotations

import sys

from caaxr_tf.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
