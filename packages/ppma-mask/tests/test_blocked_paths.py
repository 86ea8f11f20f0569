"""Log decays of −inf (decays of exactly 0): blocked paths, exact zeros, no NaN.

The oracle is ``polyline_mask_direct``, which multiplies the decay factors one by one and so
needs no cumulative sums: a factor of 0 makes the product exactly 0.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ppma_mask import (
    apply_mask,
    broadcast_factors,
    factors,
    log_mask_1d,
    log_polyline_mask,
    manhattan_mask,
    mask_1d,
    polyline_mask,
    polyline_mask_direct,
    symmetric_scan,
)
from ppma_mask.testing import blocked_grids, log_decays

paths = st.sampled_from(["v2h", "h2v", "sum"])


@given(blocked_grids())
def test_mask_matches_the_factor_by_factor_definition(decays):
    expected = polyline_mask_direct(*decays)
    got = polyline_mask(*decays)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=0)
    np.testing.assert_array_equal(got == 0, expected == 0)  # blocked entries are exact zeros


@given(blocked_grids())
def test_log_mask_is_minus_infinity_exactly_where_blocked(decays):
    log_l = log_polyline_mask(*decays)
    assert not np.isnan(log_l).any()
    np.testing.assert_array_equal(np.isneginf(log_l), polyline_mask_direct(*decays) == 0)
    np.testing.assert_array_equal(np.diag(log_l), 0.0)  # a token always reaches itself


@given(blocked_grids(), paths, st.sampled_from(["dense", "factored", "scan"]), st.data())
def test_every_product_method_gives_the_direct_mask_product(decays, path, method, data):
    height, width = decays[0].shape
    x = data.draw(st.integers(0, 2**32 - 1).map(
        lambda seed: np.random.default_rng(seed).standard_normal((height * width, 2))
    ))  # fmt: skip
    direct = polyline_mask_direct(*decays)
    mask = {"v2h": direct, "h2v": direct.T, "sum": direct + direct.T}[path]
    np.testing.assert_allclose(
        apply_mask(*decays, x, path=path, method=method), mask @ x, rtol=1e-10, atol=1e-12
    )


@given(blocked_grids())
def test_theorem_one_factors_still_multiply_to_the_mask(decays):
    l_h, l_v = factors(*decays)
    expected = polyline_mask_direct(*decays)
    np.testing.assert_allclose((l_h @ l_v).toarray(), expected, rtol=1e-11, atol=0)
    b_h, b_v = broadcast_factors(*decays)
    np.testing.assert_allclose(b_h * b_v, expected, rtol=1e-11, atol=0)


@given(st.integers(1, 12).flatmap(lambda n: log_decays((n,))), st.data())
def test_one_dimensional_mask_is_split_at_every_blocked_step(log_a, data):
    log_a = log_a.copy()
    blocked = data.draw(st.lists(st.integers(0, log_a.size - 1), max_size=3))
    log_a[blocked] = -np.inf
    n = log_a.size
    expected = np.ones((n, n))
    decay = np.exp(log_a)
    for s in range(n):
        for t in range(n):
            expected[s, t] = np.prod(decay[min(s, t) + 1 : max(s, t) + 1])
    np.testing.assert_allclose(mask_1d(log_a), expected, rtol=1e-12, atol=0)
    assert not np.isnan(log_mask_1d(log_a)).any()
    x = np.arange(1.0, n + 1)
    np.testing.assert_allclose(symmetric_scan(log_a, x), expected @ x, rtol=1e-12)


def test_a_blocked_first_step_changes_nothing():
    # The first decay of a line never enters the mask, not even as a 0.
    log_alpha = np.full((2, 3), -0.3)
    blocked = log_alpha.copy()
    blocked[:, 0] = -np.inf
    unblocked = polyline_mask(log_alpha, log_alpha)
    np.testing.assert_array_equal(polyline_mask(blocked, log_alpha), unblocked)


@pytest.mark.parametrize("path", ["v2h", "h2v"])
def test_fully_blocked_grid_is_the_identity(path):
    decays = np.full((3, 4), -np.inf)
    np.testing.assert_array_equal(polyline_mask(decays, decays, path=path), np.eye(12))


def test_manhattan_mask_with_zero_decays_is_the_identity():
    np.testing.assert_array_equal(manhattan_mask(2, 3, -np.inf, -np.inf), np.eye(6))
