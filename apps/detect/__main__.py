"""``python -m apps.detect``: see :mod:`apps.detect.cli`."""

import sys

from apps.detect.cli import main

sys.exit(main())
