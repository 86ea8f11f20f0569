"""Pure-PyTorch reference implementations of every ppma_ops op.

Written the way the authors' code computes them: the N×N log-mask is materialised and the
softmaxes are ordinary full softmaxes. Straightforward, differentiable by autograd, and
O(N²) in memory — the test oracle for the fused kernels and the fallback where the native
library is unavailable or an exportable graph is wanted.

Shapes (row-major tokens, u = i·W + j):
    q, k:                (B, heads, H, W, d)
    v, x:                (B, heads, H, W, c)
    log_alpha, log_beta: (B, heads, H, W), entries ≤ 0; −inf (a decay of 0) blocks the paths
                         through its step: their mask entries are exactly 0 (§2.7)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dtypes import accumulation_dtype

__all__ = [
    "depthwise_conv2d",
    "log_polyline_mask",
    "polyline_attention",
    "criss_cross_attention",
    "polyline_scan",
]


def first_of_line(t: torch.Tensor, dim: int) -> torch.Tensor:
    """True at each line's first entry along ``dim`` (−1: rows, −2: columns), broadcastable to t.

    That log decay never enters the mask (docs/design.md §1), so the ops leave it out of their
    cumulative sums.
    """
    first = torch.arange(t.shape[dim], device=t.device) == 0
    return first if dim == -1 else first.unsqueeze(-1)


def _split_cumsum(
    log_decay: torch.Tensor, dim: int, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumsum of log decays along ``dim`` with the −inf ones (decays of 0) counted apart.

    Returns the cumsum of the finite entries and the running count of −inf entries
    (docs/design.md §2.7): two tokens of a line are joined by an open path exactly when their
    counts agree, and their log mask is then the difference of the finite sums. Plain cumsums
    would give −inf − (−inf) = NaN for every pair behind a blocked step. Each line's first log
    decay is left out of both: it never enters the mask, and a huge or −inf one would offset
    the whole line.
    """
    t = log_decay.to(acc)
    blocked, first = torch.isneginf(t), first_of_line(t, dim)
    finite = t.masked_fill(blocked | first, 0.0)
    return torch.cumsum(finite, dim), torch.cumsum((blocked & ~first).to(acc), dim)


def _line_log_masks(c: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(…, n) tables of one line → (…, n, n) log masks −|c[s] − c[t]|, −inf across a block."""
    log_m = -(c.unsqueeze(-1) - c.unsqueeze(-2)).abs()
    return log_m.masked_fill(count.unsqueeze(-1) != count.unsqueeze(-2), float("-inf"))


def _row_col_log_masks(
    log_alpha: torch.Tensor, log_beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D log-masks of docs/design.md §1, from cumsums kept in at least float32.

    Returns log_A (B, h, H, W, W) with log_A[i, j, l] = −|Ca[i, j] − Ca[i, l]| and
    log_B (B, h, W, H, H) with log_B[l, i, k] = −|Cb[i, l] − Cb[k, l]|; −inf where a log decay
    of −inf lies on the leg (§2.7).
    """
    acc = accumulation_dtype(log_alpha.dtype)
    ca, na = _split_cumsum(log_alpha, -1, acc)  # along each row (W)
    cb, nb = _split_cumsum(log_beta, -2, acc)  # along each column (H)
    log_a = _line_log_masks(ca, na)
    log_b = _line_log_masks(cb.transpose(-1, -2), nb.transpose(-1, -2))  # (B, h, W, H, H)
    return log_a, log_b


def log_polyline_mask(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    """log L (V2H path) as a dense (B, heads, N, N) tensor, N = H·W.

    log L[(i,j),(k,l)] = −|Ca[i,j] − Ca[i,l]| − |Cb[i,l] − Cb[k,l]| (query (i,j), key (k,l)).
    """
    *lead, h, w = log_alpha.shape
    log_a, log_b = _row_col_log_masks(log_alpha, log_beta)
    # (…, i, j, l) + (…, i, k, l) → (…, i, j, k, l), the upstream H×H×W×W intermediate.
    row_term = log_a.unsqueeze(-2)  # (…, i, j, 1, l)
    col_term = log_b.permute(*range(len(lead)), -2, -1, -3).unsqueeze(-3)  # (…, i, 1, k, l)
    return (row_term + col_term).reshape(*lead, h * w, h * w)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, h, H, W, c) → (B, h, N, c)."""
    return t.flatten(2, 3)


def polyline_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Vanilla polyline attention (docs/design.md §2.3): ½·softmax(S + M)V + ½·softmax(S + Mᵀ)V.

    Returns (B, heads, H, W, c).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = log_polyline_mask(log_alpha, log_beta)
    acc = mask.dtype
    s = scale * (_flat(q).to(acc) @ _flat(k).to(acc).transpose(-1, -2))
    attn = 0.5 * torch.softmax(s + mask, dim=-1) + 0.5 * torch.softmax(
        s + mask.transpose(-1, -2), dim=-1
    )
    out = attn @ _flat(v).to(acc)
    return out.unflatten(2, q.shape[2:4]).to(v.dtype)


def criss_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Criss-cross polyline attention (docs/design.md §2.4): ½·Cc(R(V)) + ½·R(Cc(V)).

    R applies softmax(Q_i K_iᵀ + log A_i) along each row i, Cc applies
    softmax(Q_{:,l} K_{:,l}ᵀ + log B_l) along each column l. Returns (B, heads, H, W, c).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    log_a, log_b = _row_col_log_masks(log_alpha, log_beta)
    acc = log_a.dtype
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    row_attn = torch.softmax(scale * qf @ kf.transpose(-1, -2) + log_a, dim=-1)  # (B,h,H,W,W)
    qc, kc = qf.transpose(2, 3), kf.transpose(2, 3)  # (B, h, W, H, d)
    col_attn = torch.softmax(scale * qc @ kc.transpose(-1, -2) + log_b, dim=-1)  # (B,h,W,H,H)

    def rows(x: torch.Tensor) -> torch.Tensor:
        return row_attn @ x

    def cols(x: torch.Tensor) -> torch.Tensor:
        return (col_attn @ x.transpose(2, 3)).transpose(2, 3)

    out = 0.5 * cols(rows(vf)) + 0.5 * rows(cols(vf))
    return out.to(v.dtype)


def polyline_scan(
    x: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    *,
    transpose: bool = False,
) -> torch.Tensor:
    """y = L·x (or Lᵀ·x) with the dense polyline mask. x: (B, heads, H, W, c) → same shape."""
    mask = log_polyline_mask(log_alpha, log_beta)
    if transpose:
        mask = mask.transpose(-1, -2)
    y = torch.exp(mask) @ _flat(x).to(mask.dtype)
    return y.unflatten(2, x.shape[2:4]).to(x.dtype)


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise convolution of channels-last maps by ``F.conv2d`` on their NCHW view.

    x: (B, H, W, C); weight: (C, 1, kh, kw), kh and kw odd; bias: (C,) or None. Stride 1,
    "same" zero padding. Returns (B, H, W, C).
    """
    kh, kw = weight.shape[-2:]
    y = F.conv2d(
        x.permute(0, 3, 1, 2), weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[-1]
    )
    return y.permute(0, 2, 3, 1)
