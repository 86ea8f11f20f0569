"""Argument rules (shapes, dtypes, devices) of the ops, on the Python side.

The native ops check their arguments in C++ (csrc/op_args.h). These functions state the same
rules for the two places that run without that code: the reference path of the public
functions (:mod:`ppma_ops.ops`), which raises the errors as ``ValueError`` / ``TypeError``,
and the fake kernels (:mod:`ppma_ops.registration`), which raise them through
``torch._check`` under the op's name, so meta tensors and torch.compile see the errors the
kernels would give. Each ``*_error`` function returns the first problem found, or None. Values
are checked in :mod:`ppma_ops.value_checks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dtypes import FLOAT_DTYPES

ArgError = ValueError | TypeError


def _dtype_phrase(dtypes: Sequence[torch.dtype]) -> str:
    if set(dtypes) == set(FLOAT_DTYPES):
        return "a floating-point tensor"
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def dtype_error(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> ArgError | None:
    """t's dtype is one of ``dtypes``."""
    if t.dtype in dtypes:
        return None
    return TypeError(f"{name} must be {_dtype_phrase(dtypes)}, got {t.dtype}")


def same_kind_error(
    first: tuple[str, torch.Tensor], *others: tuple[str, torch.Tensor], same_dtype: bool = True
) -> ArgError | None:
    """Every tensor of ``others`` is on the device (and, with same_dtype, of the dtype) of
    ``first``."""
    first_name, f = first
    for name, t in others:
        if same_dtype and t.dtype != f.dtype:
            return TypeError(f"{name} has dtype {t.dtype} but {first_name} has {f.dtype}")
        if t.device != f.device:
            return ValueError(f"{name} is on {t.device} but {first_name} is on {f.device}")
    return None


def _log_decay_shape_error(
    grid: tuple[int, ...], log_alpha: torch.Tensor, log_beta: torch.Tensor
) -> ArgError | None:
    for name, t in (("log_alpha", log_alpha), ("log_beta", log_beta)):
        if tuple(t.shape) != grid:
            return ValueError(
                f"{name} must have shape (B, heads, H, W) = {grid}, got {tuple(t.shape)}"
            )
    return None


def attention_args_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    nonempty_head: bool = False,
) -> ArgError | None:
    """q, k: (B, heads, H, W, d); v: (B, heads, H, W, c); log_alpha, log_beta: (B, heads, H, W);
    q's dtype in ``dtypes`` and every tensor of q's dtype and device."""
    if q.dim() != 5:
        return ValueError(f"q must have shape (B, heads, H, W, d), got {tuple(q.shape)}")
    if k.shape != q.shape:
        return ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    grid = tuple(q.shape[:4])
    if v.dim() != 5 or tuple(v.shape[:4]) != grid:
        return ValueError(
            f"v must have shape (B, heads, H, W, c) matching q's {grid}, got {tuple(v.shape)}"
        )
    error = _log_decay_shape_error(grid, log_alpha, log_beta) or dtype_error("q", q, dtypes)
    if error is None and nonempty_head and q.shape[-1] == 0:
        error = ValueError("q must have a non-empty head dimension d")
    others = (("k", k), ("v", v), ("log_alpha", log_alpha), ("log_beta", log_beta))
    return error or same_kind_error(("q", q), *others)


def scan_args_error(
    x: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> ArgError | None:
    """x: (B, heads, H, W, c); log_alpha, log_beta: (B, heads, H, W); all of x's kind."""
    if x.dim() != 5:
        return ValueError(f"x must have shape (B, heads, H, W, c), got {tuple(x.shape)}")
    return (
        _log_decay_shape_error(tuple(x.shape[:4]), log_alpha, log_beta)
        or dtype_error("x", x, dtypes)
        or same_kind_error(("x", x), ("log_alpha", log_alpha), ("log_beta", log_beta))
    )


def depthwise_args_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    same_dtype: bool = False,
) -> ArgError | None:
    """x: (B, H, W, C); weight: (C, 1, kh, kw) with kh, kw odd; bias: (C,) or None; all on x's
    device. Each dtype in ``dtypes``; with same_dtype, all of x's (autocast may cast them)."""
    if x.dim() != 4:
        return ValueError(f"x must have shape (B, H, W, C), got {tuple(x.shape)}")
    c = x.shape[-1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        return ValueError(
            f"weight must have shape (C, 1, kh, kw) with C = {c} (a depthwise nn.Conv2d's "
            f"weight), got {tuple(weight.shape)}"
        )
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        return ValueError(f'the kernel size must be odd ("same" padding), got {kh}x{kw}')
    if bias is not None and tuple(bias.shape) != (c,):
        return ValueError(f"bias must have shape (C,) = ({c},), got {tuple(bias.shape)}")
    tensors = [("x", x), ("weight", weight)] + ([] if bias is None else [("bias", bias)])
    for name, t in tensors:
        if (error := dtype_error(name, t, dtypes)) is not None:
            return error
    return same_kind_error(*tensors, same_dtype=same_dtype)


def like_error(
    name: str, t: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> ArgError | None:
    """A tensor handed back to a backward op: the shape, dtype and device it was made with."""
    if tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device == device:
        return None
    return ValueError(
        f"{name} must be the {tuple(shape)} {dtype} tensor on {device} that the forward gives, "
        f"got {tuple(t.shape)} {t.dtype} on {t.device}"
    )


def grad_error(
    name: str, grad: torch.Tensor, like_name: str, like: torch.Tensor
) -> ArgError | None:
    """A gradient of an op's output: the output's shape and device."""
    if grad.shape == like.shape and grad.device == like.device:
        return None
    return ValueError(
        f"{name} must have the shape of {like_name} {tuple(like.shape)} on {like.device}, "
        f"got {tuple(grad.shape)} on {grad.device}"
    )


def _raise(error: ArgError | None) -> None:
    if error is not None:
        raise error


def check_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
) -> None:
    """Raise the first problem of :func:`attention_args_error` (any floating dtype)."""
    _raise(attention_args_error(q, k, v, log_alpha, log_beta))


def check_scan_args(x: torch.Tensor, log_alpha: torch.Tensor, log_beta: torch.Tensor) -> None:
    """Raise the first problem of :func:`scan_args_error` (any floating dtype)."""
    _raise(scan_args_error(x, log_alpha, log_beta))


def check_depthwise_conv_args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise the first problem of :func:`depthwise_args_error`; dtypes may differ (autocast
    casts them), F.conv2d reports a mismatch outside autocast."""
    _raise(depthwise_args_error(x, weight, bias))
