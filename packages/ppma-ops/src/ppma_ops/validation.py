"""Argument checks shared by the reference and native entry points.

Errors name the offending argument so a user can see which tensor is wrong.
"""

from __future__ import annotations

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
    """log_alpha, log_beta: (B, heads, H, W), all entries ≤ 0 and not NaN."""
    for name, t in (("log_alpha", log_alpha), ("log_beta", log_beta)):
        if tuple(t.shape) != tuple(grid_shape):
            raise ValueError(
                f"{name} must have shape (B, heads, H, W) = {tuple(grid_shape)}, "
                f"got {tuple(t.shape)}"
            )
        # Values are only inspected on real (non-fake, non-traced) tensors.
        if check_values and _is_concrete(t) and t.numel():
            if torch.isnan(t).any():
                raise ValueError(f"{name} contains NaN")
            if (t > 0).any():
                raise ValueError(
                    f"{name} must be <= 0 (log of a decay in (0, 1]); max is {t.max().item():.3g}"
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
