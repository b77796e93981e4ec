#!/usr/bin/env python
"""Write the TFRecord shards of the protocols of one source set: ``caaxr-make-tfrecords``.

    python tools/make_tfrecords.py --data-root DATA --out TFRECORDS [--source caaxr] [--protocol all]
        [--overwrite] [--verify]

The command lives in ``caaxr_tf.data.tfrecords`` (``main``); see ``--help``. It needs the
package installed (``make install``: an editable install of this checkout).
"""

from __future__ import annotations

import sys

from caaxr_tf.data.tfrecords import main

if __name__ == "__main__":
    sys.exit(main())
