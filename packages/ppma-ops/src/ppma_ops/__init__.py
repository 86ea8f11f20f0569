"""ppma_ops: polyline-path-masked attention operators for PyTorch.

Public ops (q, k: (B, heads, H, W, d); v, x: (B, heads, H, W, c); log decays: (B, heads, H, W)):

- :func:`polyline_attention`    vanilla polyline attention (docs/design.md §2.3)
- :func:`criss_cross_attention` criss-cross polyline attention (docs/design.md §2.4)
- :func:`polyline_scan`         y = L·x (or Lᵀ·x) in O(N·c)
- :func:`depthwise_conv2d`      the blocks' depthwise convolutions on (B, H, W, C) maps
- :func:`linear`                the blocks' projections (oneDNN's product where MKL's is slow)

Each runs the fused native kernel when the compiled library is loaded, and the pure-PyTorch
reference (:mod:`ppma_ops.reference`) otherwise, or when the reference backend is selected:
:func:`use_backend`, :func:`set_backend` or ``PPMA_OPS_BACKEND=reference``
(:mod:`ppma_ops.backend`).

Arguments are checked once per call: shapes, dtypes and devices by the native op (or, on the
reference path, :mod:`ppma_ops.validation`); log-decay values (NaN, positive, overflowing sums)
by :mod:`ppma_ops.value_checks`, always on CPU tensors and on CUDA tensors when asked for
(:func:`use_value_checks`, :func:`set_value_checks` or ``PPMA_OPS_CHECK_VALUES=1``), since
there they cost a device sync.
"""

from __future__ import annotations

from . import reference
from ._native import native_available, native_load_error
from .backend import BACKEND_ENV, BACKENDS, get_backend, set_backend, use_backend
from .onednn_linear import linear
from .ops import criss_cross_attention, depthwise_conv2d, polyline_attention, polyline_scan
from .value_checks import (
    VALUE_CHECKS_ENV,
    set_value_checks,
    use_value_checks,
    value_checks_enabled,
)

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "VALUE_CHECKS_ENV",
    "criss_cross_attention",
    "depthwise_conv2d",
    "get_backend",
    "linear",
    "native_available",
    "native_load_error",
    "polyline_attention",
    "polyline_scan",
    "reference",
    "set_backend",
    "set_value_checks",
    "use_backend",
    "use_value_checks",
    "value_checks_enabled",
]
