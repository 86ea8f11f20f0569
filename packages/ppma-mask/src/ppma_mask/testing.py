"""Hypothesis strategies and tolerances for tests that use ppma_mask as their oracle.

Imports hypothesis, so ``import ppma_mask`` does not load this module; tests import it
explicitly (``from ppma_mask.testing import grids``). The torch packages' tests can draw the same
grids and decays and compare against the float64 functions of ppma_mask.

Decays range from 1e-6 to 1 − 1e-6, spread evenly in log |log α| so that both extremes (a decay
that wipes out everything beyond one step, and one that barely decays at all) are drawn often.
On a 12×12 grid a path crosses at most 22 factors, so even the smallest products (≈1e-132)
stay far above float64's underflow threshold and relative comparisons remain meaningful.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

__all__ = [
    "LOG_DECAY_MAX",
    "LOG_DECAY_MIN",
    "assert_products_close",
    "blocked_grids",
    "grid_shapes",
    "grids",
    "log_decays",
    "right_hand_sides",
]

LOG_DECAY_MIN = math.log(1e-6)  # decay 1e-6, log ≈ −13.8
LOG_DECAY_MAX = math.log1p(-1e-6)  # decay 1 − 1e-6, log ≈ −1e-6

# Log decays are drawn as −exp(e), e uniform-ish in this range: |log α| from 1e-6 to 13.8.
_EXPONENT_RANGE = (math.log(-LOG_DECAY_MAX), math.log(-LOG_DECAY_MIN))


def grid_shapes(min_side: int = 1, max_side: int = 12) -> st.SearchStrategy[tuple[int, int]]:
    """(H, W) with both sides in [min_side, max_side]."""
    side = st.integers(min_side, max_side)
    return st.tuples(side, side)


def log_decays(shape: tuple[int, ...]) -> st.SearchStrategy[NDArray[np.float64]]:
    """Arrays of log decays in [log(1e-6), log(1 − 1e-6)] of the given shape."""
    exponents = hnp.arrays(
        np.float64,
        shape,
        elements=st.floats(*_EXPONENT_RANGE, allow_nan=False, allow_infinity=False),
    )
    return exponents.map(
        lambda e: np.clip(-np.exp(e), LOG_DECAY_MIN, LOG_DECAY_MAX)  # exp may round past ends
    )


@st.composite
def grids(
    draw: st.DrawFn, min_side: int = 1, max_side: int = 12
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(log_alpha, log_beta), both (H, W), on a random grid."""
    shape = draw(grid_shapes(min_side, max_side))
    return draw(log_decays(shape)), draw(log_decays(shape))


@st.composite
def blocked_grids(
    draw: st.DrawFn, min_side: int = 1, max_side: int = 8
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Like ``grids``, with some log decays set to −inf (decays of exactly 0, blocked steps).

    Each entry is blocked with a drawn probability up to 1/2, so grids range from a single
    blocked step to most paths cut.
    """
    log_alpha, log_beta = draw(grids(min_side, max_side))
    rate = draw(st.floats(0.05, 0.5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    for table in (log_alpha, log_beta):
        table[rng.random(table.shape) < rate] = -np.inf
    return log_alpha, log_beta


def right_hand_sides(
    n: int, max_channels: int = 4, vector: bool | None = None
) -> st.SearchStrategy[NDArray[np.float64]]:
    """x of shape (n,) or (n, C), C in [1, max_channels], entries in [−100, 100].

    ``vector`` forces (n,) (True) or (n, C) (False); None draws either.
    """
    elements = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False)
    vectors = hnp.arrays(np.float64, (n,), elements=elements)
    matrices = st.integers(1, max_channels).flatmap(
        lambda c: hnp.arrays(np.float64, (n, c), elements=elements)
    )
    if vector is None:
        return st.one_of(vectors, matrices)
    return vectors if vector else matrices


def assert_products_close(
    actual: NDArray[np.float64],
    expected: NDArray[np.float64],
    scale: NDArray[np.float64],
    rtol: float = 1e-11,
) -> None:
    """Compare two computations of a product M·x entrywise, relative to |M|·|x|.

    ``scale`` is |M|·|x| (same shape as the product): the size of the terms that were summed.
    Cancellation between terms of opposite sign can make the result itself tiny, so its own
    magnitude is no yardstick; the summed terms are. A 1e-300 floor keeps all-zero rows exact.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {actual.shape} vs {expected.shape}")
    error = np.abs(actual - expected)
    bound = rtol * np.asarray(scale) + 1e-300
    if not np.all(error <= bound):
        worst = np.unravel_index(np.argmax(error / bound), error.shape)
        raise AssertionError(
            f"products differ at {worst}: {actual[worst]!r} vs {expected[worst]!r} "
            f"(error {error[worst]:.3g}, allowed {bound[worst]:.3g})"
        )
