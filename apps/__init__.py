"""Command-line programs built on ppma_models.

Installed, they are the console scripts ``ppma-classify`` and ``ppma-segment``; in a checkout,
``python -m apps.classify`` and ``python -m apps.segment`` run the same code.
"""

import os

# OpenMP threads that spin while waiting for work slow training 15-20x when another process
# shares the cores. PASSIVE waiting costs little on an idle machine, so it is the apps' default;
# it must be set before torch (and its OpenMP runtime) is imported, and a user's choice wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
