"""The polyline path mask: 1-D masks, the 2-D mask on an H×W grid, and its layouts.

Grid conventions (docs/design.md §1): token (i, j) has flat index u = i·W + j. ``log_alpha``
(H, W) holds the horizontal log decays a = log α, ``log_beta`` (H, W) the vertical ones
b = log β. The "v2h" mask is

    L[(i,j),(k,l)] = α(i; j..l) · β(l; i..k)
                   = exp(−|Ca[i,j] − Ca[i,l]| − |Cb[i,l] − Cb[k,l]|)

with Ca the cumulative sum of a along each row and Cb that of b along each column. "h2v" is its
transpose and "sum" is L + Lᵀ.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ppma_mask import validation

__all__ = [
    "causal_mask_1d",
    "cumulative_log_decays",
    "fold",
    "log_mask_1d",
    "log_polyline_mask",
    "manhattan_mask",
    "mask_1d",
    "polyline_mask",
    "polyline_mask_direct",
    "unfold",
]


def cumsum_excluding_first(log_a: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    """Cumulative sum along ``axis`` that leaves out the first entry.

    The first decay of a row (column) never lies strictly between two tokens, so it cannot enter
    the mask. Leaving it out of the sum makes that exact in floating point (the mask does not
    change at all when it changes) and keeps the cumulative sums smaller.
    """
    trimmed = np.array(log_a, dtype=np.float64)  # a copy: the caller's array is left alone
    index = [slice(None)] * trimmed.ndim
    index[axis] = 0
    trimmed[tuple(index)] = 0.0
    return np.cumsum(trimmed, axis=axis)


def line_log_masks(log_lines: NDArray[np.float64]) -> NDArray[np.float64]:
    """The log 1-D mask of every line: (m, n) log decays → (m, n, n), no argument checks.

    Entry [q, s, t] is −|C_s − C_t| over the line's cumsum C, except that a step with log decay
    −inf (a decay of 0) in (min(s, t), max(s, t)] makes it −inf. Subtracting cumsums that both
    passed such a step would give −inf − (−inf) = NaN, so the −inf steps are counted apart from
    the finite partial sums: pairs on the same side of every −inf step subtract finite sums
    exactly, pairs with different counts between them are blocked.
    """
    blocked = np.isneginf(log_lines)
    finite = cumsum_excluding_first(np.where(blocked, 0.0, log_lines), axis=1)
    crossed = cumsum_excluding_first(blocked.astype(np.float64), axis=1)
    log_masks = finite[:, :, None] - finite[:, None, :]
    np.abs(log_masks, out=log_masks)
    np.negative(log_masks, out=log_masks)
    log_masks[crossed[:, :, None] != crossed[:, None, :]] = -np.inf
    return log_masks


def cumulative_log_decays(
    log_alpha: ArrayLike, log_beta: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The cumsum tables (Ca, Cb), each (H, W).

    ``Ca[i, j] = Σ_{0<t≤j} log_alpha[i, t]`` (along rows), ``Cb[i, l] = Σ_{0<s≤i} log_beta[s, l]``
    (along columns). Any constant offset per row (column) cancels in the mask; this one makes
    ``Ca[:, 0] = Cb[0, :] = 0``. A log decay of −inf makes the rest of its line −inf (the
    masks themselves are built from finite partial sums, see ``line_log_masks``).
    """
    a, b = validation.log_decay_grid(log_alpha, log_beta)
    return cumsum_excluding_first(a, axis=1), cumsum_excluding_first(b, axis=0)


def log_mask_1d(log_a: ArrayLike) -> NDArray[np.float64]:
    """Log of the symmetric 1-D mask: (n,) → (n, n), entries −|C_s − C_t| ≤ 0.

    −inf where a log decay of −inf lies between s and t (the path is blocked).
    """
    a = validation.log_decay_1d(log_a, "log_a")
    return line_log_masks(a[None, :])[0]


def mask_1d(log_a: ArrayLike) -> NDArray[np.float64]:
    """Symmetric 1-D decay mask: (n,) → (n, n), ``M[s, t] = Π_{min(s,t) < r ≤ max(s,t)} α_r``.

    Symmetric with unit diagonal; its lower triangle is Mamba2's mask (``causal_mask_1d``).
    ``log_a[0]`` never enters.
    """
    return np.exp(log_mask_1d(log_a))


def causal_mask_1d(log_a: ArrayLike) -> NDArray[np.float64]:
    """Mamba2's lower-triangular (1-semiseparable) mask: (n,) → (n, n).

    ``M[s, t] = Π_{t < r ≤ s} α_r`` for t ≤ s, 0 above the diagonal; ``causal_scan`` applies it
    as a recurrence.
    """
    return np.tril(mask_1d(log_a))


def _log_mask_v2h(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """log L for validated (H, W) log decays, as an (N, N) array (row-major tokens)."""
    height, width = a.shape
    # horizontal leg: depends on (i, j, l) only; vertical leg: on (i, k, l) only.
    horizontal = line_log_masks(a)  # [i, j, l]
    vertical = line_log_masks(b.T).transpose(1, 2, 0)  # [l, i, k] → [i, k, l]
    log_l = horizontal[:, :, None, :] + vertical[:, None, :, :]  # [i, j, k, l], the N×N one
    n = height * width
    return log_l.reshape(n, n)


def log_polyline_mask(
    log_alpha: ArrayLike, log_beta: ArrayLike, path: validation.Path = "v2h"
) -> NDArray[np.float64]:
    """log of ``polyline_mask``: (H, W), (H, W) → (N, N), computed without exponentiating.

    For "sum" it is log(L + Lᵀ), evaluated stably with ``logaddexp``.
    """
    a, b = validation.log_decay_grid(log_alpha, log_beta)
    path = validation.path_name(path)
    log_l = _log_mask_v2h(a, b)
    if path == "v2h":
        return log_l
    if path == "h2v":
        return np.ascontiguousarray(log_l.T)
    return np.logaddexp(log_l, log_l.T)


def polyline_mask(
    log_alpha: ArrayLike, log_beta: ArrayLike, path: validation.Path = "v2h"
) -> NDArray[np.float64]:
    """The polyline path mask: (H, W), (H, W) → (N, N), N = H·W, row-major tokens.

    path="v2h": vertical leg along the key's column, then horizontal along the query's row
    (entries in (0, 1], unit diagonal). "h2v": the other polyline, equal to the transpose.
    "sum": L + Lᵀ, the paper's 2-D mask (entries in (0, 2], diagonal 2).
    """
    a, b = validation.log_decay_grid(log_alpha, log_beta)
    path = validation.path_name(path)
    mask = _log_mask_v2h(a, b)
    np.exp(mask, out=mask)
    if path == "v2h":
        return mask
    if path == "h2v":
        return np.ascontiguousarray(mask.T)
    return mask + mask.T


def polyline_mask_direct(log_alpha: ArrayLike, log_beta: ArrayLike) -> NDArray[np.float64]:
    """The "v2h" mask straight from its definition, as a test oracle.

    Multiplies the decay factors crossed on each L-shaped path one by one, with no cumulative
    sums and no factorisation: O(N²·(H + W)) Python work, meant for grids up to about 12×12.
    """
    a, b = validation.log_decay_grid(log_alpha, log_beta)
    height, width = a.shape
    alpha = np.exp(a).tolist()
    beta_columns = np.exp(b).T.tolist()  # beta_columns[l][s] = β[s, l]
    mask = np.empty((height, width, height, width))
    for i in range(height):
        for j in range(width):
            for k in range(height):
                for l in range(width):
                    horizontal = math.prod(alpha[i][min(j, l) + 1 : max(j, l) + 1])
                    vertical = math.prod(beta_columns[l][min(i, k) + 1 : max(i, k) + 1])
                    mask[i, j, k, l] = horizontal * vertical
    n = height * width
    return mask.reshape(n, n)


def fold(matrix: ArrayLike, height: int, width: int) -> NDArray[np.float64]:
    """(N, N) token matrix → (H, W, H, W) with ``T[i, j, k, l] = M[i·W + j, k·W + l]``."""
    height = validation.grid_size(height, "H")
    width = validation.grid_size(width, "W")
    m = validation.as_float_array(matrix, "M")
    n = height * width
    if m.shape != (n, n):
        raise ValueError(f"M must have shape ({n}, {n}) for a {height}x{width} grid, got {m.shape}")
    return m.reshape(height, width, height, width)


def unfold(tensor: ArrayLike) -> NDArray[np.float64]:
    """(H, W, H, W) → (N, N), the inverse of ``fold``."""
    t = validation.as_float_array(tensor, "T")
    if t.ndim != 4 or t.shape[:2] != t.shape[2:] or 0 in t.shape:
        raise ValueError(f"T must have shape (H, W, H, W) with H, W >= 1, got {t.shape}")
    n = t.shape[0] * t.shape[1]
    return t.reshape(n, n)


def manhattan_mask(
    height: int, width: int, log_gamma_row: float, log_gamma_col: float
) -> NDArray[np.float64]:
    """RMT's Manhattan decay mask on an H×W grid: (N, N).

    ``M[(i,j),(k,l)] = γ_row^{|j−l|} · γ_col^{|i−k|}``, where ``log_gamma_row`` is the decay per
    step *along a row* (the horizontal one, a constant α) and ``log_gamma_col`` the decay per step
    along a column (a constant β). With both equal to log γ it is γ^{|i−k|+|j−l|}.
    """
    height = validation.grid_size(height, "H")
    width = validation.grid_size(width, "W")
    g_row = validation.log_decay_scalar(log_gamma_row, "log_gamma_row")
    g_col = validation.log_decay_scalar(log_gamma_col, "log_gamma_col")
    log_h = _steps_times(g_row, width)  # [j, l]
    log_v = _steps_times(g_col, height)  # [i, k]
    log_m = log_h[None, :, None, :] + log_v[:, None, :, None]
    n = height * width
    return np.exp(log_m).reshape(n, n)


def _steps_times(log_gamma: float, n: int) -> NDArray[np.float64]:
    """(n, n) array log_gamma·|s − t|, 0 on the diagonal also for log_gamma = −inf (γ⁰ = 1)."""
    steps = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]).astype(np.float64)
    out = np.zeros_like(steps)
    np.multiply(log_gamma, steps, out=out, where=steps > 0)
    return out
