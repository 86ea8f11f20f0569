"""Public entry points: check the log-decay values, then run the native op or the reference.

Each argument is checked once per call. The native ops (``torch.ops.ppma.*``, registered by the
compiled library with their fake kernels and autograd, :mod:`ppma_ops.registration`) check
shapes, dtypes and devices in C++; the reference path checks them here
(:mod:`ppma_ops.validation`). Log-decay values are checked here for both
(:mod:`ppma_ops.value_checks`: always on CPU tensors, on CUDA tensors when asked for).
"""

from __future__ import annotations

import torch

from . import reference
from ._native import has_native_op, warn_if_unavailable
from .validation import check_attention_args, check_depthwise_conv_args, check_scan_args
from .value_checks import check_log_decay_values

# dtypes of the native depthwise convolution (other dtypes and devices use F.conv2d).
_DEPTHWISE_NATIVE_DTYPES = (torch.float32, torch.float64)


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
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    check_log_decay_values(log_alpha, log_beta)
    if has_native_op("polyline_attention"):
        return torch.ops.ppma.polyline_attention(q, k, v, log_alpha, log_beta, scale)
    warn_if_unavailable()
    check_attention_args(q, k, v, log_alpha, log_beta)
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
    """Criss-cross polyline attention: ½·Cc(R(V)) + ½·R(Cc(V)) (docs/design.md §2.4).

    Shapes as :func:`polyline_attention`. Returns (B, heads, H, W, c).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    check_log_decay_values(log_alpha, log_beta)
    if has_native_op("criss_cross_attention"):
        return torch.ops.ppma.criss_cross_attention(q, k, v, log_alpha, log_beta, scale)
    warn_if_unavailable()
    check_attention_args(q, k, v, log_alpha, log_beta)
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
    check_log_decay_values(log_alpha, log_beta)
    if has_native_op("polyline_scan"):
        return torch.ops.ppma.polyline_scan(x, log_alpha, log_beta, transpose)
    warn_if_unavailable()
    check_scan_args(x, log_alpha, log_beta)
    return reference.polyline_scan(x, log_alpha, log_beta, transpose=transpose)


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise convolution of channels-last maps, stride 1, "same" zero padding.

    x: (B, H, W, C); weight: (C, 1, kh, kw) with kh, kw odd, as a depthwise
    ``nn.Conv2d(C, C, k, groups=C)`` stores it; bias: (C,) or None. Returns (B, H, W, C), equal
    to ``F.conv2d`` on the NCHW view of x, permuted back. The native kernel runs on float32 and
    float64 CPU tensors of one dtype outside autocast; elsewhere (CUDA, autocast, mixed
    dtypes) ``F.conv2d`` does, with its own casting rules and errors.
    """
    # Checked here for both paths: choosing one needs well-formed arguments, and the errors
    # stay those of F.conv2d's callers (ValueError / TypeError) whichever path runs.
    check_depthwise_conv_args(x, weight, bias)
    native_case = (
        x.device.type == "cpu"
        and x.dtype in _DEPTHWISE_NATIVE_DTYPES
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and not torch.is_autocast_enabled("cpu")
    )
    if native_case:
        if has_native_op("depthwise_conv2d"):
            return torch.ops.ppma.depthwise_conv2d(x, weight, bias)
        warn_if_unavailable()
    return reference.depthwise_conv2d(x, weight, bias)
