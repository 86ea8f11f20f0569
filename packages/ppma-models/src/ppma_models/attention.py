"""Polyline-path-masked attention layers (docs/design.md §2.2–2.4).

Both kinds share the plumbing — q/k/v projections, the decay field, the flat-index rotary
embedding, LePE and the output projection — and differ only in the masked-attention operator
from :mod:`ppma_ops` they call:

* :class:`PolylineAttention` ("V" stages): ½·softmax(S + M)V + ½·softmax(S + Mᵀ)V over all
  tokens.
* :class:`CrissCrossAttention` ("X" stages): row and column softmaxes with the 1-D log masks,
  applied in both orders and averaged.

The layers call the public ``ppma_ops`` functions only; whether those run the fused kernels or
the plain-PyTorch reference is ppma_ops' choice (``ppma_ops.use_backend("reference")``).
"""

from __future__ import annotations

import ppma_ops
import torch
from torch import nn

from .decay import DecayField
from .linear import Linear
from .residual_conv import depthwise_conv
from .rope import apply_rotary


class MaskedAttention(nn.Module):
    """Shared plumbing of the polyline attention layers; subclasses pick the operator.

    Input x: (B, H, W, C), the LayerNorm-ed block input (channels last); rotation: (H, W, d/2)
    complex, from FlatRotaryEmbedding. Output (B, H, W, C).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        # LePE: depthwise 5×5 conv on v, added to the attention output.
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.out_proj = Linear(dim, dim)
        self.decay = DecayField(dim, heads)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        log_alpha: torch.Tensor,
        log_beta: torch.Tensor,
    ) -> torch.Tensor:
        """The masked attention: q, k, v (B, heads, H, W, d), log decays (B, heads, H, W)
        → (B, heads, H, W, d). q·kᵀ is used unscaled (k carries d^-1/2)."""
        raise NotImplementedError

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, heads, H, W, d)."""
        b, h, w, _ = t.shape
        return t.view(b, h, w, self.heads, self.head_dim).permute(0, 3, 1, 2, 4)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        v = self.v_proj(x)
        log_alpha, log_beta = self.decay(x)
        q, k = self.q_proj(x), self.k_proj(x)
        # Under bf16/fp16 autocast the projections come out in low precision while the decay
        # head may not; the ops take one dtype (and compute in float32 regardless). Converting
        # before the rotation lets it take its fast complex form.
        dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), log_alpha.dtype)
        q = apply_rotary(self._split_heads(q.to(dtype)), rotation)
        # k is scaled by d^-1/2 (as upstream); folded into its rotation to save a pass.
        k = apply_rotary(self._split_heads(k.to(dtype)), rotation * self.head_dim**-0.5)
        v_heads = self._split_heads(v).to(dtype)
        log_alpha, log_beta = log_alpha.to(dtype), log_beta.to(dtype)
        out = self.attend(q, k, v_heads, log_alpha, log_beta)
        lepe = depthwise_conv(v, self.lepe.weight, self.lepe.bias)
        # Merging the heads back to channels last is the LePE addition itself: with the
        # contiguous LePE map as first operand the sum is written channels last in one pass.
        merged = torch.add(
            lepe.view(b, h, w, self.heads, self.head_dim), out.permute(0, 2, 3, 1, 4)
        )
        return self.out_proj(merged.reshape(b, h, w, c))


class PolylineAttention(MaskedAttention):
    """Vanilla polyline attention over all N = H·W tokens (docs/design.md §2.3, "V" stages)."""

    def attend(self, *q_k_v_decays: torch.Tensor) -> torch.Tensor:
        return ppma_ops.polyline_attention(*q_k_v_decays, scale=1.0)


class CrissCrossAttention(MaskedAttention):
    """Criss-cross polyline attention along rows and columns (docs/design.md §2.4, "X" stages)."""

    def attend(self, *q_k_v_decays: torch.Tensor) -> torch.Tensor:
        return ppma_ops.criss_cross_attention(*q_k_v_decays, scale=1.0)


ATTENTION_BY_KIND: dict[str, type[MaskedAttention]] = {
    "V": PolylineAttention,
    "X": CrissCrossAttention,
}
