"""Fake kernels and autograd of ``torch.ops.ppma.depthwise_conv2d`` (csrc/depthwise_conv2d.cpp).

The backward op returns the gradients of x and of the weight; the bias gradient is a plain
sum of grad_out over (B, H, W), left to ATen.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("ppma::depthwise_conv2d")
def _depthwise_conv2d_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ppma::depthwise_conv2d_backward")
def _depthwise_conv2d_backward_fake(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.ppma.depthwise_conv2d_backward(grad_out, x, weight)
    grad_bias = grad_out.sum((0, 1, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


torch.library.register_autograd("ppma::depthwise_conv2d", _backward, setup_context=_setup_context)
