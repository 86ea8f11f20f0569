"""Polyline-path-masked attention layers (docs/design.md §2.2–2.4).

Both kinds share the plumbing — q/k/v projections, the decay field, the flat-index rotary
embedding, LePE and the output projection — and differ only in the masked-attention operator
from :mod:`ppma_ops` they call:

* :class:`PolylineAttention` ("V" stages): ½·softmax(S + M)V + ½·softmax(S + Mᵀ)V over all
  tokens.
* :class:`CrissCrossAttention` ("X" stages): row and column softmaxes with the 1-D log masks,
  applied in both orders and averaged.

The operator implementation is selectable per module (and per model, see
``PPMA.set_attention``): ``"native"`` uses the public ``ppma_ops`` entry points (fused
kernels where the compiled library registered them, else the reference with a warning),
``"reference"`` always uses the plain-PyTorch ``ppma_ops.reference`` functions. The switch
covers the block's depthwise convolutions too (LePE here, CPE and the feed-forward's in
:mod:`.block`), which ppma_ops also provides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import ppma_ops
import torch
from ppma_ops import reference
from torch import nn

from .decay import DecayField
from .residual_conv import depthwise_conv
from .rope import apply_rotary

#: Accepted values for the ``attention`` implementation switch.
ATTENTION_IMPLS = ("native", "reference")

AttentionOp = Callable[..., torch.Tensor]


def check_attention_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


class MaskedAttention(nn.Module):
    """Shared plumbing of the polyline attention layers; subclasses pick the operator.

    Input x: (B, H, W, C), the LayerNorm-ed block input (channels last); rotary tables
    (sin, cos): (H, W, d). Output (B, H, W, C).
    """

    native_op: ClassVar[AttentionOp]
    reference_op: ClassVar[AttentionOp]

    def __init__(self, dim: int, heads: int, *, impl: str = "native") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.impl = check_attention_impl(impl)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        # LePE: depthwise 5×5 conv on v, added to the attention output.
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.out_proj = nn.Linear(dim, dim)
        self.decay = DecayField(dim, heads)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, impl={self.impl!r}"

    def set_impl(self, impl: str) -> None:
        self.impl = check_attention_impl(impl)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, heads, H, W, d)."""
        b, h, w, _ = t.shape
        return t.view(b, h, w, self.heads, self.head_dim).permute(0, 3, 1, 2, 4)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C); rotation: (H, W, d/2) complex, from FlatRotaryEmbedding."""
        b, h, w, c = x.shape
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        log_alpha, log_beta = self.decay(x)
        q = apply_rotary(self._split_heads(q), rotation)
        # k is scaled by d^-1/2 (as upstream); folded into its rotation to save a pass.
        k = apply_rotary(self._split_heads(k), rotation * self.head_dim**-0.5)
        op = type(self).native_op if self.impl == "native" else type(self).reference_op
        # Under bf16/fp16 autocast the projections come out in low precision while the decay
        # head may not; the ops take one dtype (and accumulate in float32 regardless).
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), log_alpha.dtype)
        q, k, v_heads, log_alpha, log_beta = (
            t.to(dtype) for t in (q, k, self._split_heads(v), log_alpha, log_beta)
        )
        out = op(q, k, v_heads, log_alpha, log_beta, scale=1.0)  # the op must not scale again
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        lepe = depthwise_conv(v, self.lepe.weight, self.lepe.bias, self.impl)
        return self.out_proj(out + lepe)


class PolylineAttention(MaskedAttention):
    """Vanilla polyline attention over all N = H·W tokens (docs/design.md §2.3, "V" stages)."""

    native_op = staticmethod(ppma_ops.polyline_attention)
    reference_op = staticmethod(reference.polyline_attention)


class CrissCrossAttention(MaskedAttention):
    """Criss-cross polyline attention along rows and columns (docs/design.md §2.4, "X" stages)."""

    native_op = staticmethod(ppma_ops.criss_cross_attention)
    reference_op = staticmethod(reference.criss_cross_attention)


ATTENTION_BY_KIND: dict[str, type[MaskedAttention]] = {
    "V": PolylineAttention,
    "X": CrissCrossAttention,
}
