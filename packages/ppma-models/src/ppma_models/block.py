"""One PPMA transformer block (docs/design.md §2.5)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import ATTENTION_BY_KIND
from .drop_path import DropPath
from .feedforward import ConvFeedForward
from .residual_conv import residual_depthwise_conv

LAYER_NORM_EPS = 1e-6


class PPMABlock(nn.Module):
    """Conditional position encoding, then pre-norm attention and feed-forward residuals.

        x = x + DWConv3×3(x)
        x = x + DropPath(γ₁ · Attn(LN(x)))
        x = x + DropPath(γ₂ · FFN(LN(x)))

    γ₁, γ₂ (per-channel layer scale) exist only when ``layer_scale`` is set.
    x: (B, H, W, C) channels last → same shape.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        attention_kind: str,
        *,
        drop_path: float = 0.0,
        layer_scale: bool = False,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        # Registration order = the authors' state-dict order (exports read like their files).
        self.attn_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = ATTENTION_BY_KIND[attention_kind](dim, heads)
        self.ffn_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ffn = ConvFeedForward(dim, int(mlp_ratio * dim))
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.drop_path = DropPath(drop_path)
        if layer_scale:
            self.attn_layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.ffn_layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.attn_layer_scale = None
            self.ffn_layer_scale = None

    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        x = residual_depthwise_conv(x, self.cpe)  # a fresh tensor this block owns
        y = self.attn(self.attn_norm(x), rotation)
        if self.attn_layer_scale is not None:
            y = self.attn_layer_scale * y
        x = _add_residual(x, self.drop_path(y))
        y = self.ffn(self.ffn_norm(x))
        if self.ffn_layer_scale is not None:
            y = self.ffn_layer_scale * y
        return _add_residual(x, self.drop_path(y))


def _add_residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y; in place when no graph is recorded (x is then a block-owned temporary)."""
    return x + y if torch.is_grad_enabled() else x.add_(y)
