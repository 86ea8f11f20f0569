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
        # Without a graph to record, the residual sums go into that tensor in place.
        inplace = not torch.is_grad_enabled()
        y = self.attn(self.attn_norm(x), rotation)
        x = self.drop_path.add_branch(x, y, self.attn_layer_scale, inplace=inplace)
        y = self.ffn(self.ffn_norm(x))
        return self.drop_path.add_branch(x, y, self.ffn_layer_scale, inplace=inplace)
