"""Loading the compiled library.

Importing ``ppma_ops._C`` registers the ``torch.ops.ppma.*`` kernels. A missing or broken
library never breaks ``import ppma_ops``: the reason is kept and reported, and the public
functions use the pure-PyTorch reference instead.
"""

from __future__ import annotations

import warnings

import torch

from .backend import get_backend

# The ops with a kernel per device (CPU, and CUDA where built with it): every op of the
# library but the CompositeImplicitAutograd public attention ops and the CPU-only depthwise
# convolution.
CUDA_KERNEL_OPS = (
    "_polyline_attention_fwd",
    "_polyline_attention_bwd",
    "_criss_cross_attention_fwd",
    "_criss_cross_attention_bwd",
    "_criss_cross_attention_inference",
    "polyline_scan",
    "_polyline_scan_bwd",
)

_load_error: str | None = None
try:
    from . import (
        _C,  # noqa: F401  (registers the native kernels)
        registration,  # noqa: F401  (their fake kernels and autograd)
    )
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    _C = None
    _load_error = f"{type(exc).__name__}: {exc}"


def native_available() -> bool:
    """True when the compiled kernels are loaded (whichever backend is selected)."""
    return _C is not None


# The public ops the library registered, looked up once: a plain set keeps has_native_op
# traceable by torch.compile (a functools.cache lookup would make Dynamo warn or break).
PUBLIC_OPS = ("polyline_attention", "criss_cross_attention", "polyline_scan", "depthwise_conv2d")
_REGISTERED = frozenset(
    name for name in PUBLIC_OPS if _C is not None and hasattr(torch.ops.ppma, name)
)


def has_native_op(op_name: str) -> bool:
    """True when the "native" backend is selected and ``torch.ops.ppma.<op_name>`` exists."""
    return get_backend() == "native" and op_name in _REGISTERED


def native_load_error() -> str | None:
    """Why the compiled library could not be loaded (None when it was)."""
    return _load_error


def warn_if_unavailable() -> None:
    if _C is None:
        warnings.warn(
            "ppma_ops: the native library could not be loaded "
            f"({_load_error}); using the pure-PyTorch reference ops, which are slower and "
            "materialise N×N masks. Rebuild with `pip install --no-build-isolation "
            "packages/ppma-ops` against the installed torch.",
            RuntimeWarning,
            stacklevel=3,
        )
