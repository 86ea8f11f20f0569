"""``python -m apps.segment``: see :mod:`apps.segment.cli`."""

import sys

from apps.segment.cli import main

sys.exit(main())
