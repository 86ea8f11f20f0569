"""Argument checks shared by the reference and native entry points.

Errors name the offending argument so a user can see which tensor is wrong.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_spatial_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    check_values: bool = True,
) -> None:
    """Validate attention arguments.

    q, k: (B, heads, H, W, d); v: (B, heads, H, W, d_v); log_alpha, log_beta: (B, heads, H, W).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 5:
            raise ValueError(f"{name} must have shape (B, heads, H, W, d), got {tuple(t.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(
            f"v must have shape (B, heads, H, W, d_v) matching q's {tuple(q.shape[:4])}, "
            f"got {tuple(v.shape)}"
        )
    check_log_decays(log_alpha, log_beta, q.shape[:4], check_values=check_values)
    check_same_kind(q=q, k=k, v=v, log_alpha=log_alpha, log_beta=log_beta)


def check_log_decays(
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    grid_shape: torch.Size | tuple[int, ...],
    *,
    check_values: bool = True,
) -> None:
    """log_alpha, log_beta: (B, heads, H, W), entries ≤ 0 and not NaN (docs/design.md §2.7).

    −inf (a decay of 0) is allowed. The finite entries of each row of log_alpha and each
    column of log_beta must sum to a finite number in the accumulation dtype (float32, float64
    for float64 inputs): the ops' cumulative sums would overflow otherwise.
    """
    for name, t, dim in (("log_alpha", log_alpha, -1), ("log_beta", log_beta, -2)):
        if tuple(t.shape) != tuple(grid_shape):
            raise ValueError(
                f"{name} must have shape (B, heads, H, W) = {tuple(grid_shape)}, "
                f"got {tuple(t.shape)}"
            )
        # Values are only inspected on real (non-fake, non-traced) tensors.
        if check_values and _is_concrete(t) and t.numel():
            _check_log_decay_values(name, t, dim)


def _check_log_decay_values(name: str, t: torch.Tensor, dim: int) -> None:
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one pass, one sync; NaN propagates
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{name} contains NaN")
    if hi > 0:
        raise ValueError(f"{name} must be <= 0 (log of a decay in [0, 1]); max is {hi:.3g}")
    acc = torch.promote_types(t.dtype, torch.float32)
    limit = torch.finfo(acc).max
    if lo * t.shape[dim] >= -limit:
        return  # no line can sum past the limit (and no entry is −inf)
    # The sums the ops form: cumulative, in order, without the line's first log decay (it
    # never enters the mask), so a line overflows where the last of them does.
    finite = t.to(acc).masked_fill(torch.isneginf(t) | first_of_line(t, dim), 0.0)
    if torch.isinf(finite.cumsum(dim).select(dim, -1)).any():
        line = "row" if dim == -1 else "column"
        raise ValueError(
            f"{name}: the finite log decays of a {line} sum below {-limit:.4g}, the {acc} "
            "limit of the cumulative sums; use -inf for a decay of exactly 0"
        )


def check_same_kind(*, same_dtype: bool = True, **tensors: torch.Tensor) -> None:
    """All tensors floating point, on one device and (with same_dtype) of one dtype."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if same_dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def first_of_line(t: torch.Tensor, dim: int) -> torch.Tensor:
    """True at each line's first entry along ``dim`` (−1: rows, −2: columns), broadcastable to t.

    That log decay never enters the mask (docs/design.md §1), so the ops leave it out of their
    cumulative sums.
    """
    first = torch.arange(t.shape[dim], device=t.device) == 0
    return first if dim == -1 else first.unsqueeze(-1)


def _is_concrete(t: torch.Tensor) -> bool:
    # First: under torch.compile, is_fake itself may not be traced (fullgraph would break).
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(t):
            return False
    except ImportError:  # pragma: no cover - very old torch
        pass
    return not torch.compiler.is_compiling()


def check_depthwise_conv_args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """x: (B, H, W, C); weight: (C, 1, kh, kw) with kh, kw odd; bias: (C,) or None.

    dtypes may differ (autocast casts them); F.conv2d reports a mismatch outside autocast.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, H, W, C), got {tuple(x.shape)}")
    c = x.shape[-1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(
            f"weight must have shape (C, 1, kh, kw) with C = {c} (a depthwise nn.Conv2d's "
            f"weight), got {tuple(weight.shape)}"
        )
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'the kernel size must be odd ("same" padding), got {kh}x{kw}')
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"bias must have shape (C,) = ({c},), got {tuple(bias.shape)}")
    tensors = {"x": x, "weight": weight} | ({} if bias is None else {"bias": bias})
    check_same_kind(same_dtype=False, **tensors)
