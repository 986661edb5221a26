"""``python -m visionattn.train [args]``: the training entry point (``accelerate launch -m``)."""

import sys

from visionattn.train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
