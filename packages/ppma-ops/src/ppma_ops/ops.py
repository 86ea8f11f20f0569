"""Public entry points: validate, then run the native op or the reference.

The native ops (``torch.ops.ppma.*``) are registered by the compiled library together with
their fake kernels and autograd formulas (see the per-op registration modules).
"""

from __future__ import annotations

import torch

from . import reference
from ._native import has_native_op, warn_if_unavailable
from .validation import check_log_decays, check_same_kind, check_spatial_args


def polyline_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Vanilla polyline attention: (½·softmax(S + M) + ½·softmax(S + Mᵀ))·V, S = scale·q kᵀ.

    q, k: (B, heads, H, W, d); v: (B, heads, H, W, c); log_alpha, log_beta: (B, heads, H, W),
    all ≤ 0. scale defaults to d^-0.5. Returns (B, heads, H, W, c).
    """
    check_spatial_args(q, k, v, log_alpha, log_beta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if has_native_op("polyline_attention"):
        return torch.ops.ppma.polyline_attention(q, k, v, log_alpha, log_beta, scale)
    warn_if_unavailable()
    return reference.polyline_attention(q, k, v, log_alpha, log_beta, scale=scale)


def criss_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Criss-cross polyline attention: ½·Cc(R(V)) + ½·R(Cc(V)) (DESIGN §2.4).

    Shapes as :func:`polyline_attention`. Returns (B, heads, H, W, c).
    """
    check_spatial_args(q, k, v, log_alpha, log_beta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if has_native_op("criss_cross_attention"):
        return torch.ops.ppma.criss_cross_attention(q, k, v, log_alpha, log_beta, scale)
    warn_if_unavailable()
    return reference.criss_cross_attention(q, k, v, log_alpha, log_beta, scale=scale)


def polyline_scan(
    x: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    transpose: bool = False,
) -> torch.Tensor:
    """y = L·x (Lᵀ·x with transpose=True) by forward/backward scans, O(N·c).

    x: (B, heads, H, W, c); log_alpha, log_beta: (B, heads, H, W), ≤ 0. Returns x's shape.
    """
    if x.dim() != 5:
        raise ValueError(f"x must have shape (B, heads, H, W, c), got {tuple(x.shape)}")
    check_log_decays(log_alpha, log_beta, x.shape[:4])
    check_same_kind(x=x, log_alpha=log_alpha, log_beta=log_beta)
    if has_native_op("polyline_scan"):
        return torch.ops.ppma.polyline_scan(x, log_alpha, log_beta, transpose)
    warn_if_unavailable()
    return reference.polyline_scan(x, log_alpha, log_beta, transpose=transpose)
