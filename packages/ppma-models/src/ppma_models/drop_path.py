"""Stochastic depth: drop a whole residual branch per sample during training."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero the branch for a random subset of samples (probability ``p``), rescale the rest.

    Identity in eval mode or when p = 0. Input (B, ...).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"

    def _sample_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factors 0 or 1/(1 − p), shape (B, 1, ..., 1); None when inactive."""
        if not self.training or self.p == 0.0:
            return None
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x.new_empty(shape).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._sample_scale(x)
        return x if scale is None else x * scale

    def add_branch(
        self,
        x: torch.Tensor,
        branch: torch.Tensor,
        layer_scale: torch.Tensor | None = None,
        *,
        inplace: bool = False,
    ) -> torch.Tensor:
        """x + DropPath(layer_scale · branch) in one pass over the activations.

        x, branch: (B, ..., C); layer_scale: (C,) or None. The per-sample factor and the
        per-channel layer scale are multiplied first (a (B, 1, ..., C) tensor), so the sum is
        one ``addcmul`` instead of up to four passes. ``inplace`` writes into x (for x a
        temporary the caller owns, when no graph is recorded).
        """
        scale = self._sample_scale(branch)
        if layer_scale is not None:
            scale = layer_scale if scale is None else scale * layer_scale
        if scale is None:
            return x.add_(branch) if inplace else x + branch
        return x.addcmul_(branch, scale) if inplace else torch.addcmul(x, branch, scale)
