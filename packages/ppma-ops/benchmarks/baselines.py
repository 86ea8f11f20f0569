"""Attention baselines shared by bench_ops.py (CPU) and bench_cuda.py (GPU), any device.

Both compute vanilla polyline attention (docs/design.md §2.3) without ppma_ops' kernels:
``sdpa_polyline_attention`` with the materialised float log-mask M (and Mᵀ), the construction
timed with it; ``make_flex_polyline_attention`` with FlexAttention score_mods that read the
cumsum tables, so no N×N tensor exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from ppma_ops import reference

__all__ = ["make_flex_polyline_attention", "sdpa_polyline_attention"]


def sdpa_polyline_attention(q, k, v, log_alpha, log_beta, scale):
    """Two SDPA calls with the materialised float log-mask (mask construction included)."""
    mask = reference.log_polyline_mask(log_alpha, log_beta).to(q.dtype)  # (B, h, N, N)
    qf, kf, vf = (t.flatten(2, 3) for t in (q, k, v))
    out = 0.5 * F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    out = out + 0.5 * F.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=mask.transpose(-1, -2), scale=scale
    )
    return out.unflatten(2, q.shape[2:4])


def make_flex_polyline_attention(h: int, w: int) -> Callable:
    """FlexAttention: two compiled flex_attention calls (M and Mᵀ as score_mods), averaged."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, log_alpha, log_beta, scale):
        # Cumsum tables in float32 at least, as the ops keep them.
        ca = torch.cumsum(log_alpha.float(), -1)
        cb = torch.cumsum(log_beta.float(), -2)

        def mask_v2h(score, b, hh, qi, ki):
            i, j, kr, l = qi // w, qi % w, ki // w, ki % w
            return (
                score
                - (ca[b, hh, i, j] - ca[b, hh, i, l]).abs()
                - (cb[b, hh, i, l] - cb[b, hh, kr, l]).abs()
            )

        def mask_h2v(score, b, hh, qi, ki):
            i, j, kr, l = qi // w, qi % w, ki // w, ki % w
            return (
                score
                - (ca[b, hh, kr, l] - ca[b, hh, kr, j]).abs()
                - (cb[b, hh, kr, j] - cb[b, hh, i, j]).abs()
            )

        qf, kf, vf = (t.flatten(2, 3) for t in (q, k, v))
        out = 0.5 * compiled(qf, kf, vf, score_mod=mask_v2h, scale=scale)
        out = out + 0.5 * compiled(qf, kf, vf, score_mod=mask_h2v, scale=scale)
        return out.unflatten(2, (h, w))

    return run
