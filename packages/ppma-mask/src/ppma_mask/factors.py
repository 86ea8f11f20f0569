"""Theorem 1: the polyline mask is a product of a horizontal and a vertical 1-D factor.

With A_i (W×W) the 1-D mask of row i built from α and B_l (H×H) that of column l built from β,

    L_H = blockdiag(A_0, …, A_{H−1}),   [L_V]_{(i,j),(k,l)} = δ_{jl} · [B_l]_{i,k},
    L = L_H · L_V = L̂_H ⊙ L̂_V,          Lᵀ = L_V · L_H,

where L̂_H[(i,j),(k,l)] = [A_i]_{j,l} and L̂_V[(i,j),(k,l)] = [B_l]_{i,k} broadcast the factors to
N×N. L_H and L_V hold H·W² and W·H² nonzeros, so the product costs O(N^{3/2}) per column.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from ppma_mask import validation
from ppma_mask.mask import line_log_masks

__all__ = ["broadcast_factors", "column_masks", "factors", "row_masks"]


def stack_line_masks(log_lines: NDArray[np.float64]) -> NDArray[np.float64]:
    """The 1-D mask of every line: (m, n) log decays → (m, n, n). No argument checks."""
    log_masks = line_log_masks(log_lines)
    return np.exp(log_masks, out=log_masks)


def row_masks(log_alpha: ArrayLike) -> NDArray[np.float64]:
    """The horizontal 1-D masks A_i stacked: (H, W) → (H, W, W), ``[A_i]_{j,l} = α(i; j..l)``."""
    return stack_line_masks(validation.log_decay_table(log_alpha, "log_alpha"))


def column_masks(log_beta: ArrayLike) -> NDArray[np.float64]:
    """The vertical 1-D masks B_l stacked: (H, W) → (W, H, H), ``[B_l]_{i,k} = β(l; i..k)``."""
    return stack_line_masks(validation.log_decay_table(log_beta, "log_beta").T)


def factors(log_alpha: ArrayLike, log_beta: ArrayLike) -> tuple[sp.csr_array, sp.csr_array]:
    """The sparse Theorem-1 factors (L_H, L_V), each (N, N) in CSR format, with L = L_H @ L_V."""
    a, b = validation.log_decay_grid(log_alpha, log_beta)
    height, width = a.shape
    n = height * width
    row_blocks = stack_line_masks(a)  # [i, j, l]
    column_blocks = stack_line_masks(b.T)  # [l, i, k]

    i, j, l = np.meshgrid(np.arange(height), np.arange(width), np.arange(width), indexing="ij")
    l_h = sp.csr_array(
        (row_blocks.ravel(), ((i * width + j).ravel(), (i * width + l).ravel())), shape=(n, n)
    )
    l, i, k = np.meshgrid(np.arange(width), np.arange(height), np.arange(height), indexing="ij")
    l_v = sp.csr_array(
        (column_blocks.ravel(), ((i * width + l).ravel(), (k * width + l).ravel())), shape=(n, n)
    )
    return l_h, l_v


def broadcast_factors(
    log_alpha: ArrayLike, log_beta: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The factors broadcast to dense (N, N) matrices (L̂_H, L̂_V), with L = L̂_H ⊙ L̂_V."""
    a, b = validation.log_decay_grid(log_alpha, log_beta)
    height, width = a.shape
    n = height * width
    row_blocks = stack_line_masks(a)  # [i, j, l]
    column_blocks = stack_line_masks(b.T)  # [l, i, k]
    l_h = np.broadcast_to(row_blocks[:, :, None, :], (height, width, height, width))
    l_v = np.broadcast_to(
        column_blocks.transpose(1, 2, 0)[:, None, :, :], (height, width, height, width)
    )
    return l_h.reshape(n, n), l_v.reshape(n, n)
