"""Linear-time products with 1-D decay masks: recurrences instead of matrices (Corollary 2).

A causal (forward) scan h_s = α_s · h_{s−1} + x_s applies Mamba2's lower-triangular mask, a
backward scan g_s = x_s + α_{s+1} · g_{s+1} its transpose, and forward + backward − x applies the
symmetric mask ``mask_1d``. Running sums are only ever *multiplied* by a decay in (0, 1], never
divided by a cumulative product, so decays near 0 (log α ≈ −14 or below) are harmless.

The grid passes below scan along one axis of an (n, m, C) array with all m lines and C channels
updated at once, so the Python loop has n steps and each step is a vectorised O(m·C) update.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ppma_mask import validation

__all__ = ["anticausal_scan", "causal_scan", "mamba2_recurrence", "symmetric_scan"]


def forward_scan_lines(decay: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
    """h[s] = decay[s] · h[s−1] + x[s] along axis 0; decay (n, m), x (n, m, C) → (n, m, C)."""
    out = np.empty_like(x)
    out[0] = x[0]
    for s in range(1, x.shape[0]):
        np.multiply(decay[s, :, None], out[s - 1], out=out[s])
        out[s] += x[s]
    return out


def backward_scan_lines(decay: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
    """g[s] = x[s] + decay[s+1] · g[s+1] along axis 0; decay (n, m), x (n, m, C) → (n, m, C)."""
    out = np.empty_like(x)
    out[-1] = x[-1]
    for s in range(x.shape[0] - 2, -1, -1):
        np.multiply(decay[s + 1, :, None], out[s + 1], out=out[s])
        out[s] += x[s]
    return out


def symmetric_scan_lines(decay: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Apply the symmetric 1-D mask of every line: forward scan + backward scan − x.

    decay (n, m) holds α (not its log) for m independent lines of length n; x is (n, m, C).
    ``out[:, q] = mask_1d(log decay[:, q]) @ x[:, q]`` for every line q, in O(n·m·C).
    """
    out = forward_scan_lines(decay, x)
    # g[s] − x[s] = decay[s+1]·g[s+1]: add that to the forward sums instead of adding g and
    # subtracting x (one pass, no cancellation of x against itself).
    carry = x[-1].copy()
    tail = np.empty_like(carry)
    for s in range(x.shape[0] - 2, -1, -1):
        np.multiply(decay[s + 1, :, None], carry, out=tail)
        out[s] += tail
        np.add(x[s], tail, out=carry)
    return out


def _sequence_and_rhs(
    log_a: ArrayLike, x: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], bool]:
    a = validation.log_decay_1d(log_a, "log_a")
    rhs = validation.right_hand_side(x, a.shape[0])
    vector = rhs.ndim == 1
    lines = rhs.reshape(a.shape[0], 1, -1)
    return np.exp(a)[:, None], lines, vector


def _result(out: NDArray[np.float64], vector: bool) -> NDArray[np.float64]:
    n = out.shape[0]
    return out.reshape(n) if vector else out.reshape(n, -1)


def causal_scan(log_a: ArrayLike, x: ArrayLike) -> NDArray[np.float64]:
    """Mamba2's recurrence h_s = α_s · h_{s−1} + x_s, h_{−1} = 0: log_a (n,), x (n,) or (n, C).

    Equals ``causal_mask_1d(log_a) @ x`` in O(n·C).
    """
    decay, lines, vector = _sequence_and_rhs(log_a, x)
    return _result(forward_scan_lines(decay, lines), vector)


def anticausal_scan(log_a: ArrayLike, x: ArrayLike) -> NDArray[np.float64]:
    """The backward recurrence g_s = x_s + α_{s+1} · g_{s+1}, g_n = 0.

    Equals ``causal_mask_1d(log_a).T @ x`` in O(n·C).
    """
    decay, lines, vector = _sequence_and_rhs(log_a, x)
    return _result(backward_scan_lines(decay, lines), vector)


def symmetric_scan(log_a: ArrayLike, x: ArrayLike) -> NDArray[np.float64]:
    """``mask_1d(log_a) @ x`` in O(n·C): forward scan + backward scan − x."""
    decay, lines, vector = _sequence_and_rhs(log_a, x)
    return _result(symmetric_scan_lines(decay, lines), vector)


def mamba2_recurrence(
    log_a: ArrayLike, b: ArrayLike, c: ArrayLike, x: ArrayLike
) -> NDArray[np.float64]:
    """Mamba2's selective state-space recurrence (scalar decay per step), run step by step.

    State h_s = α_s · h_{s−1} + b_s ⊗ x_s (shape (d_state, C)) and output y_s = c_sᵀ h_s, with
    log_a (n,), b and c (n, d_state), x (n,) or (n, C). Its matrix ("dual") form is
    ``y = ((c @ b.T) ⊙ causal_mask_1d(log_a)) @ x``.
    """
    a = validation.log_decay_1d(log_a, "log_a")
    n = a.shape[0]
    rhs = validation.right_hand_side(x, n)
    b_arr = validation.as_float_array(b, "b")
    c_arr = validation.as_float_array(c, "c")
    if b_arr.ndim != 2 or b_arr.shape[0] != n:
        raise ValueError(f"b must have shape ({n}, d_state), got {b_arr.shape}")
    if c_arr.shape != b_arr.shape:
        raise ValueError(f"c must have the same shape as b {b_arr.shape}, got {c_arr.shape}")
    validation.check_finite(b_arr, "b")
    validation.check_finite(c_arr, "c")
    decay = np.exp(a)
    x2 = rhs.reshape(n, -1)
    state = np.zeros((b_arr.shape[1], x2.shape[1]))
    y = np.empty_like(x2)
    for s in range(n):
        state *= decay[s]
        state += np.outer(b_arr[s], x2[s])
        y[s] = c_arr[s] @ state
    return y.reshape(rhs.shape)
