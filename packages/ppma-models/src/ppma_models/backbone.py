"""The hierarchical trunk: convolutional stem, downsampling, and stages (docs/design.md §2.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .block import PPMABlock
from .config import STEM_STRIDES
from .rope import FlatRotaryEmbedding


class Stem(nn.Module):
    """Four 3×3 convs (strides 2, 1, 2, 1) with BatchNorm, GELU between: output stride 4.
    With ``stride=2`` the first runs at stride 1 (same parameters, twice the resolution).

    x: (B, in_chans, H, W) → (B, ⌈H/stride⌉, ⌈W/stride⌉, dim) channels last (rounding up at
    each stride-2 step).
    """

    def __init__(self, in_chans: int, dim: int, stride: int = 4) -> None:
        super().__init__()
        if stride not in STEM_STRIDES:
            raise ValueError(f"Stem stride must be one of {STEM_STRIDES}, got {stride}")
        half = dim // 2
        self.conv1 = nn.Conv2d(in_chans, half, 3, stride=stride // 2, padding=1)
        self.norm1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, stride=1, padding=1)
        self.norm2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, dim, 3, stride=2, padding=1)
        self.norm3 = nn.BatchNorm2d(dim)
        self.conv4 = nn.Conv2d(dim, dim, 3, stride=1, padding=1)
        self.norm4 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last convolutions make the final permute to (B, H, W, C) free, so every
        # stage works on contiguous tokens.
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.gelu(self.norm1(self.conv1(x)))
        x = F.gelu(self.norm2(self.conv2(x)))
        x = F.gelu(self.norm3(self.conv3(x)))
        x = self.norm4(self.conv4(x))
        return x.permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """Conv3×3 stride 2 (bias) + BatchNorm between stages; odd sizes round up.

    x: (B, H, W, C_in) → (B, ⌈H/2⌉, ⌈W/2⌉, C_out), channels last.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class PPMAStage(nn.Module):
    """[Downsample] then ``depth`` blocks at one resolution; channels last in and out.

    The rotary table depends only on the grid and head size, so it is built once per
    stage call and shared by its blocks.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        attention_kind: str,
        *,
        in_dim: int | None = None,
        drop_paths: Sequence[float] = (),
        layer_scale: bool = False,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        drop_paths = list(drop_paths) or [0.0] * depth
        if len(drop_paths) != depth:
            raise ValueError(f"need {depth} drop-path rates, got {len(drop_paths)}")
        self.attention_kind = attention_kind
        self.downsample = Downsample(in_dim, dim) if in_dim is not None else None
        self.rotary = FlatRotaryEmbedding(dim // heads)
        self.blocks = nn.ModuleList(
            PPMABlock(
                dim,
                heads,
                mlp_ratio,
                attention_kind,
                drop_path=p,
                layer_scale=layer_scale,
                layer_scale_init=layer_scale_init,
            )
            for p in drop_paths
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        _, h, w, _ = x.shape
        rotation = self.rotary(h, w, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rotation, use_reentrant=False)
            else:
                x = block(x, rotation)
        return x
