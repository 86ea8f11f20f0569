"""The classification head of PPMA (docs/design.md §2.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierHead(nn.Module):
    """Per-token Linear(C → hidden) → BatchNorm over channels → Swish → global average pool
    → Linear(hidden → classes). No final LayerNorm.

    x: (B, H, W, C) channels last → logits (B, classes), or the pooled (B, hidden) vector
    with ``pre_logits=True``. ``num_classes=0`` makes ``fc`` the identity.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 1024) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.hidden = hidden
        self.proj = nn.Linear(in_dim, hidden)
        self.norm = nn.BatchNorm2d(hidden)
        self.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → the pooled (B, hidden) vector."""
        if self.proj is None:  # reset(..., reset_other=True): plain average pooling
            return x.mean(dim=(1, 2))
        h = self.norm(self.proj(x).permute(0, 3, 1, 2))
        return F.silu(h).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.pool(x)
        return pooled if pre_logits else self.fc(pooled)

    def reset(self, num_classes: int, reset_other: bool = False) -> None:
        """Replace the final classifier (e.g. for fine-tuning on another label set).

        reset_other: also drop the projection, BatchNorm and Swish before the pooling, so
        the head averages the last stage's C channels (timm's meaning).
        """
        self.num_classes = num_classes
        device = next((p.device for p in self.parameters()), None)
        if reset_other and self.proj is not None:
            self.hidden = self.proj.in_features
            self.proj = self.norm = None
        if num_classes > 0:
            self.fc = nn.Linear(self.hidden, num_classes, device=device)
            nn.init.trunc_normal_(self.fc.weight, std=0.02)
            nn.init.zeros_(self.fc.bias)
        else:
            self.fc = nn.Identity()
