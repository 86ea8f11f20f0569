"""Fake kernels and autograd of ``ppma::depthwise_conv2d`` (csrc/depthwise_conv2d.cpp).

The backward op ``ppma::_depthwise_conv2d_bwd`` gives the gradients of x and weight; the bias
gradient is grad_out summed over (B, H, W). Under ``create_graph=True`` the gradients come from
the reference (``F.conv2d``) instead, so higher derivatives are exact (:mod:`._graph_backward`).
"""

from __future__ import annotations

import torch

from .. import reference
from ..validation import depthwise_args_error
from ._fake import check, contiguous_like
from ._graph_backward import builds_graph, reference_gradients

_KERNEL_DTYPES = (torch.float32, torch.float64)
_BWD = "_depthwise_conv2d_bwd"


def _check_args(op: str, x, weight, bias) -> None:
    check(op, depthwise_args_error(x, weight, bias, dtypes=_KERNEL_DTYPES, same_dtype=True))


@torch.library.register_fake("ppma::depthwise_conv2d")
def _depthwise_conv2d_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    _check_args("depthwise_conv2d", x, weight, bias)
    return contiguous_like(x)


@torch.library.register_fake(f"ppma::{_BWD}")
def _depthwise_conv2d_bwd_fake(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_args(_BWD, x, weight, None)
    torch._check(
        grad_out.shape == x.shape and grad_out.dtype == x.dtype,
        lambda: (
            f"{_BWD}: grad_out must have the shape and dtype of x {tuple(x.shape)}, got "
            f"{tuple(grad_out.shape)} {grad_out.dtype}"
        ),
    )
    return contiguous_like(x), contiguous_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: torch.Tensor):
    x, weight = ctx.saved_tensors
    if builds_graph(grad_out, x, weight) and x.numel() > 0:
        # create_graph=True: a backward autograd can differentiate again (second derivatives).
        grad_x, grad_weight = reference_gradients(
            lambda x, w: reference.depthwise_conv2d(x, w), (x, weight), grad_out
        )
    else:
        grad_x, grad_weight = torch.ops.ppma._depthwise_conv2d_bwd(grad_out, x, weight)
    grad_bias = grad_out.sum((0, 1, 2)) if ctx.has_bias else None
    return grad_x, grad_weight, grad_bias


torch.library.register_autograd("ppma::depthwise_conv2d", _backward, setup_context=_setup_context)
