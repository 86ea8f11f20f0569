"""The block's feed-forward network with a depthwise convolution in the hidden layer."""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear
from .residual_conv import residual_depthwise_conv


class ConvFeedForward(nn.Module):
    """fc1 (C → hidden) → GELU → h + DWConv3×3(h) → fc2 (hidden → C).

    x: (B, H, W, C) channels last → same shape.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x, activation="gelu")
        return self.fc2(residual_depthwise_conv(h, self.dwconv))
