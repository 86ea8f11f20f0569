"""Which implementation the public ops run: the one place that choice is held.

``"native"`` runs the fused kernels of the compiled library (falling back to the reference, with
one warning, where the library is missing); ``"reference"`` runs :mod:`ppma_ops.reference`.
The default comes from the ``PPMA_OPS_BACKEND`` environment variable (``native`` when unset);
change it for the process with :func:`set_backend` or for a block with :func:`use_backend`::

    with ppma_ops.use_backend("reference"):
        y = model(x)  # every ppma_ops call inside runs the plain-PyTorch reference

The choice is read where each op is dispatched (``ppma_ops.ops``), so models, blocks and apps
never carry it. It is process-wide, like timm's ``set_fused_attn``: not per thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

BACKENDS = ("native", "reference")
BACKEND_ENV = "PPMA_OPS_BACKEND"


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _check(os.environ.get(BACKEND_ENV, "") or "native", BACKEND_ENV)


def get_backend() -> str:
    """The backend the ops dispatch to: "native" or "reference"."""
    return _backend


def set_backend(name: str) -> None:
    """Make every later ppma_ops call in this process run ``name`` ("native" or "reference")."""
    global _backend
    _backend = _check(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops with ``name`` inside the ``with`` block, then restore the previous choice."""
    global _backend
    previous, _backend = _backend, _check(name, "backend")
    try:
        yield
    finally:
        _backend = previous
