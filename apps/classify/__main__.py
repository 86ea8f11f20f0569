"""``python -m apps.classify``."""

from apps.classify.cli import main

raise SystemExit(main())
