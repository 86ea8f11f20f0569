"""The blocks' projections: ``nn.Linear`` whose product runs through :func:`ppma_ops.linear`."""

from __future__ import annotations

import ppma_ops
import torch
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by :func:`ppma_ops.linear`,
    which takes oneDNN's faster product on CPUs where MKL's is slow. x: (..., in) → (..., out).
    """

    def forward(self, x: torch.Tensor, *, activation: str | None = None) -> torch.Tensor:
        """activation: None or "gelu" (applied to the output, fused where possible)."""
        return ppma_ops.linear(x, self.weight, self.bias, activation=activation)
