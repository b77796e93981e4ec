"""``python -m caaxr_tf <verb> ...``: the same as the ``caaxr`` command (``caaxr_tf.cli``)."""

import sys

from caaxr_tf.cli import main

if __name__ == "__main__":
    sys.exit(main())
