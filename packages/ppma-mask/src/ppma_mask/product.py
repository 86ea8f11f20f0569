"""y = L·x three ways: dense matrix, Algorithm 1 (two 1-D mixes), and scans.

All three take the log decays and x and return y, so their costs compare like for like:

- "dense": build the N×N mask, then one matrix product. O(N²·C) time, O(N²) memory.
- "factored" (Theorem 2 / Algorithm 1): Z[:, l] = B_l X[:, l] for every column, then
  Y[i, :] = A_i Z[i, :] for every row, with the 1-D masks built densely. O(N^{3/2}·C).
- "scan" (Corollary 2): each 1-D mix done by a forward and a backward scan. O(N·C).

For "v2h" (L) the column mix comes first; "h2v" (Lᵀ = L_V·L_H) mixes rows first; "sum" adds both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ppma_mask import validation
from ppma_mask.factors import stack_line_masks
from ppma_mask.mask import polyline_mask
from ppma_mask.scan import symmetric_scan_lines

__all__ = ["apply_mask"]

Mix = Callable[[NDArray[np.float64]], NDArray[np.float64]]


# The 1-D masks are built and applied a batch of lines at a time, at most this many entries per
# batch (1 MiB of float64): a batch is still in cache when it is used, and the extra memory stays
# at one batch instead of the whole (H, W, W) stack (134 MB at 256×256).
_BATCH_MASK_ENTRIES = 1 << 17


def _mix_lines_by_masks(
    log_lines: NDArray[np.float64], data: NDArray[np.float64]
) -> NDArray[np.float64]:
    """out[q] = mask_1d(log_lines[q]) @ data[q] for every line q; (m, n) and (m, n, C)."""
    m, n = log_lines.shape
    out = np.empty_like(data)
    step = max(1, _BATCH_MASK_ENTRIES // (n * n))
    for start in range(0, m, step):
        batch = slice(start, start + step)
        np.matmul(stack_line_masks(log_lines[batch]), data[batch], out=out[batch])
    return out


def _factored_mixes(a: NDArray[np.float64], b: NDArray[np.float64]) -> tuple[Mix, Mix]:
    """Row and column mixes of an (H, W, C) array with the dense 1-D masks (batched matmul)."""
    b_by_column = np.ascontiguousarray(b.T)  # (W, H): line l is column l

    def mix_rows(grid: NDArray[np.float64]) -> NDArray[np.float64]:
        return _mix_lines_by_masks(a, grid)  # Y[i] = A_i · Z[i]

    def mix_columns(grid: NDArray[np.float64]) -> NDArray[np.float64]:
        by_column = np.ascontiguousarray(grid.transpose(1, 0, 2))  # (W, H, C)
        return _mix_lines_by_masks(b_by_column, by_column).transpose(1, 0, 2)  # B_l · X[:, l]

    return mix_rows, mix_columns


def _scan_mixes(a: NDArray[np.float64], b: NDArray[np.float64]) -> tuple[Mix, Mix]:
    """Row and column mixes of an (H, W, C) array by forward/backward scans."""
    alpha_by_column = np.ascontiguousarray(np.exp(a).T)  # (W, H): scan over columns j
    beta = np.exp(b)  # (H, W): scan over rows i

    def mix_rows(grid: NDArray[np.float64]) -> NDArray[np.float64]:
        by_column = np.ascontiguousarray(grid.transpose(1, 0, 2))  # (W, H, C)
        return symmetric_scan_lines(alpha_by_column, by_column).transpose(1, 0, 2)

    def mix_columns(grid: NDArray[np.float64]) -> NDArray[np.float64]:
        return symmetric_scan_lines(beta, grid)

    return mix_rows, mix_columns


def apply_mask(
    log_alpha: ArrayLike,
    log_beta: ArrayLike,
    x: ArrayLike,
    path: validation.Path = "v2h",
    method: validation.Method = "scan",
) -> NDArray[np.float64]:
    """The mask times x: L·x ("v2h"), Lᵀ·x ("h2v") or (L + Lᵀ)·x ("sum").

    log_alpha, log_beta: (H, W) log decays ≤ 0. x: (N,) or (N, C), N = H·W, row-major tokens.
    Returns an array shaped like x. ``method`` is "dense", "factored" or "scan" (see module doc).
    """
    a, b = validation.log_decay_grid(log_alpha, log_beta)
    path = validation.path_name(path)
    method = validation.method_name(method)
    height, width = a.shape
    n = height * width
    rhs = validation.right_hand_side(x, n)

    if method == "dense":
        return polyline_mask(a, b, path) @ rhs

    mix_rows, mix_columns = (_factored_mixes if method == "factored" else _scan_mixes)(a, b)
    grid = rhs.reshape(height, width, -1)
    if path == "v2h":
        y = mix_rows(mix_columns(grid))
    elif path == "h2v":
        y = mix_columns(mix_rows(grid))
    else:
        y = mix_rows(mix_columns(grid)) + mix_columns(mix_rows(grid))
    return np.ascontiguousarray(y).reshape(rhs.shape)
