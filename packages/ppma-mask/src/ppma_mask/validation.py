"""Argument checks shared by the public functions.

Every check converts its argument to a float64 array and raises ``ValueError`` whose message
starts with the argument's name, so a caller can tell at once which input was wrong.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Path = Literal["v2h", "h2v", "sum"]
Method = Literal["dense", "factored", "scan"]

PATHS: tuple[str, ...] = ("v2h", "h2v", "sum")
METHODS: tuple[str, ...] = ("dense", "factored", "scan")


def as_float_array(value: ArrayLike, name: str) -> NDArray[np.float64]:
    """``value`` as a float64 array; ValueError (naming ``name``) if it is not real numbers."""
    if np.iscomplexobj(value):
        raise ValueError(f"{name} must be real, got a complex array")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an array of real numbers ({error})") from None
    return array


def check_finite(array: NDArray[np.float64], name: str) -> None:
    """Reject NaN and ±inf."""
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")


def check_log_decay_values(array: NDArray[np.float64], name: str) -> None:
    """A log decay must be ≤ 0 and not NaN (the decay itself lies in [0, 1]).

    −inf is a decay of exactly 0: it blocks every path that steps onto its token, whose mask
    entries are then exactly 0 (docs/design.md §2.7).
    """
    nan = int(np.count_nonzero(np.isnan(array)))
    if nan:
        raise ValueError(f"{name} contains {nan} NaN value(s)")
    if array.size and array.max() > 0.0:
        raise ValueError(
            f"{name} must be <= 0 (the log of a decay in [0, 1]); its largest entry is "
            f"{array.max():.6g}"
        )


def log_decay_1d(log_a: ArrayLike, name: str = "log_a") -> NDArray[np.float64]:
    """Check a 1-D sequence of log decays of length ≥ 1."""
    array = as_float_array(log_a, name)
    if array.ndim != 1 or array.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    check_log_decay_values(array, name)
    return array


def log_decay_grid(
    log_alpha: ArrayLike, log_beta: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Check the two (H, W) tables of log decays: same shape, H, W ≥ 1, ≤ 0, no NaN."""
    alpha = log_decay_table(log_alpha, "log_alpha")
    beta = as_float_array(log_beta, "log_beta")
    if beta.shape != alpha.shape:
        raise ValueError(
            f"log_beta must have the same shape as log_alpha {alpha.shape}, got {beta.shape}"
        )
    check_log_decay_values(beta, "log_beta")
    return alpha, beta


def log_decay_table(value: ArrayLike, name: str) -> NDArray[np.float64]:
    """Check one (H, W) table of log decays: H, W ≥ 1, ≤ 0, no NaN."""
    table = as_float_array(value, name)
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"{name} must have shape (H, W) with H, W >= 1, got {table.shape}")
    check_log_decay_values(table, name)
    return table


def right_hand_side(x: ArrayLike, n: int, name: str = "x") -> NDArray[np.float64]:
    """Check x of shape (n,) or (n, C) with finite entries."""
    array = as_float_array(x, name)
    if array.ndim not in (1, 2) or array.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) or ({n}, C), got {array.shape}")
    check_finite(array, name)
    return array


def path_name(path: str) -> Path:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path  # type: ignore[return-value]


def method_name(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def grid_size(value: object, name: str) -> int:
    """A positive integer grid extent (H or W)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def log_decay_scalar(value: object, name: str) -> float:
    """A single log decay ≤ 0 (−inf allowed), not NaN."""
    array = as_float_array(value, name)  # type: ignore[arg-type]
    if array.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {array.shape}")
    check_log_decay_values(array, name)
    return float(array)
