"""Fake kernels of ``torch.ops.ppma.depthwise_conv2d`` and its backward.

Its autograd formula is registered in C++ (csrc/depthwise_conv2d.cpp, Autograd key): the op
runs three times per block on small maps, where a Python backward cost as much as the kernel.
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
