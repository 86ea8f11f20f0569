"""Masked linear attention through Theorem 3.

((Q Kᵀ) ⊙ L) V has entries y_u = Σ_v (q_u · k_v) L[u, v] v_v = Σ_m q_u[m] · (L · (k[:, m] v))_u,
so one mask product with the d·C right-hand sides k ⊗ v replaces the N×N attention matrix:
O(N·d·C) with the scan product.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ppma_mask import validation
from ppma_mask.product import apply_mask

__all__ = ["masked_linear_attention"]


def masked_linear_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    log_alpha: ArrayLike,
    log_beta: ArrayLike,
    path: validation.Path = "v2h",
    method: validation.Method = "scan",
) -> NDArray[np.float64]:
    """((q kᵀ) ⊙ M) v with M the polyline mask of ``path`` (L, Lᵀ or L + Lᵀ).

    q, k: (N, d); v: (N,) or (N, C); log_alpha, log_beta: (H, W) with H·W = N.
    Returns (N,) or (N, C) like v. No N×N matrix is formed unless ``method="dense"``.
    """
    a, b = validation.log_decay_grid(log_alpha, log_beta)
    n = a.size
    queries = validation.as_float_array(q, "q")
    keys = validation.as_float_array(k, "k")
    if queries.ndim != 2 or queries.shape[0] != n:
        raise ValueError(
            f"q must have shape ({n}, d) for a {a.shape[0]}x{a.shape[1]} grid, got {queries.shape}"
        )
    if keys.shape != queries.shape:
        raise ValueError(f"k must have the same shape as q {queries.shape}, got {keys.shape}")
    validation.check_finite(queries, "q")
    validation.check_finite(keys, "k")
    values = validation.right_hand_side(v, n, "v")

    values_2d = values.reshape(n, -1)
    d, c = queries.shape[1], values_2d.shape[1]
    key_value = (keys[:, :, None] * values_2d[:, None, :]).reshape(n, d * c)  # k ⊗ v per token
    mixed = apply_mask(a, b, key_value, path=path, method=method).reshape(n, d, c)
    y = np.einsum("nm,nmc->nc", queries, mixed)
    return y.reshape(values.shape)
