"""The decay field: per-token, per-head log decay factors log α and log β (docs/design.md §2.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DecayField(nn.Module):
    """Predicts log_alpha (horizontal) and log_beta (vertical) decays from the tokens.

    One bias-free Linear(d, 2), shared by all heads, reads each head's d-channel slice of the
    (LayerNorm-ed) tokens and gives (δα, δβ). With per-head ``dt_bias`` and ``A_log``:

        log_alpha = −exp(A_log) · softplus(δα + dt_bias)
        log_beta  = −exp(A_log) · softplus(δβ + dt_bias)

    so α, β ∈ (0, 1) strictly. ``dt_bias`` and ``A_log`` get the Mamba2 initialisation and
    are excluded from weight decay (see :meth:`no_weight_decay`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        a_init_range: tuple[float, float] = (1.0, 1.1),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.heads = heads
        self.head_dim = dim // heads
        self.proj = nn.Linear(self.head_dim, 2, bias=False)
        # Mamba2: dt log-uniform in [dt_min, dt_max], dt_bias = softplus⁻¹(dt).
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(*a_init_range).log())

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"

    @staticmethod
    def no_weight_decay() -> set[str]:
        """Parameter names (relative to this module) that must not be weight-decayed."""
        return {"dt_bias", "A_log"}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, H, W, C) → (log_alpha, log_beta), each (B, heads, H, W), entries < 0."""
        b, h, w, c = x.shape
        delta = self.proj(x.reshape(b, h, w, self.heads, self.head_dim))  # (B, H, W, heads, 2)
        # One layout change of this small tensor to (2, B, heads, H, W): both log decays then
        # come out contiguous, the layout the attention ops read (and save for backward).
        delta = delta.permute(4, 0, 3, 1, 2).contiguous()
        rate = -torch.exp(self.A_log)[:, None, None]
        log_decays = rate * F.softplus(delta + self.dt_bias[:, None, None])
        log_alpha, log_beta = log_decays.unbind(0)
        return log_alpha, log_beta
