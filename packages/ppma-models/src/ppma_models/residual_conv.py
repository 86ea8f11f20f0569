"""The blocks' depthwise convolutions on (B, H, W, C) maps, through ``ppma_ops.depthwise_conv2d``
(the fused CPU kernel where it applies, F.conv2d elsewhere or under the reference backend)."""

from __future__ import annotations

import ppma_ops
import torch
from torch import nn


def depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Depthwise "same" convolution: x (B, H, W, C), weight (C, 1, kh, kw) → (B, H, W, C)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            b = None if bias is None else bias.float()
            return ppma_ops.depthwise_conv2d(x.float(), weight.float(), b).to(dtype)
    return ppma_ops.depthwise_conv2d(x, weight, bias)


def residual_depthwise_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """x + conv(x) for a depthwise ``conv`` with odd kernel and "same" padding.

    x: (B, H, W, C) channels last → same shape. The identity is folded into the kernel's
    centre tap, which saves a full pass over the (often largest) activation tensor;
    gradients flow to the conv weight exactly as for the unfused form.
    """
    kh, kw = conv.kernel_size
    centre = torch.zeros((kh, kw), dtype=conv.weight.dtype, device=conv.weight.device)
    centre[kh // 2, kw // 2] = 1
    return depthwise_conv(x, conv.weight + centre, conv.bias)
