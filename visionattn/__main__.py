"""``python -m visionattn``: same as the ``visionattn`` console script."""

import sys

from visionattn.cli import main

sys.exit(main())
