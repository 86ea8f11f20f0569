"""Scans against the mask products they replace (Corollary 2, Mamba2's recurrent form)."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ppma_mask import (
    anticausal_scan,
    causal_mask_1d,
    causal_scan,
    mamba2_recurrence,
    mask_1d,
    symmetric_scan,
)
from ppma_mask.testing import assert_products_close, log_decays, right_hand_sides


@st.composite
def sequences_and_rhs(draw):
    n = draw(st.integers(1, 40))
    return draw(log_decays((n,))), draw(right_hand_sides(n))


@given(sequences_and_rhs())
def test_causal_scan_is_the_causal_mask_product(case):
    log_a, x = case
    m = causal_mask_1d(log_a)
    assert_products_close(causal_scan(log_a, x), m @ x, np.abs(m) @ np.abs(x))


@given(sequences_and_rhs())
def test_anticausal_scan_is_the_transposed_causal_mask_product(case):
    log_a, x = case
    m = causal_mask_1d(log_a).T
    assert_products_close(anticausal_scan(log_a, x), m @ x, np.abs(m) @ np.abs(x))


@given(sequences_and_rhs())
def test_forward_plus_backward_scan_is_the_symmetric_mask_product(case):
    log_a, x = case
    m = mask_1d(log_a)
    y = symmetric_scan(log_a, x)
    assert y.shape == x.shape
    assert_products_close(y, m @ x, np.abs(m) @ np.abs(x))


@st.composite
def ssm_cases(draw):
    n = draw(st.integers(1, 30))
    d_state = draw(st.integers(1, 4))
    elements = st.floats(-10.0, 10.0)
    b = draw(hnp.arrays(np.float64, (n, d_state), elements=elements))
    c = draw(hnp.arrays(np.float64, (n, d_state), elements=elements))
    return draw(log_decays((n,))), b, c, draw(right_hand_sides(n))


@given(ssm_cases())
def test_mamba2_recurrence_equals_masked_matrix_form(case):
    """State-space duality: the recurrent form equals ((C Bᵀ) ⊙ causal mask) x."""
    log_a, b, c, x = case
    kernel = (c @ b.T) * causal_mask_1d(log_a)
    scale = (np.abs(c) @ np.abs(b).T * causal_mask_1d(log_a)) @ np.abs(x)
    y = mamba2_recurrence(log_a, b, c, x)
    assert y.shape == x.shape
    assert_products_close(y, kernel @ x, scale)


def test_scans_stay_finite_over_long_sequences_of_extreme_decays():
    """Decays alternate between ~1e-300 and 1 − 1e-6 over 5,000 steps: a scan only multiplies
    by decays, so nothing overflows (dividing by cumulative products would reach e^{+10^6})."""
    n = 5000
    log_a = np.where(np.arange(n) % 2 == 0, -690.0, -1e-6)
    x = np.random.default_rng(0).standard_normal((n, 2))
    y = symmetric_scan(log_a, x)
    assert np.all(np.isfinite(y))
    # Each step across an odd→even boundary multiplies by ~1e-300, so y[s] is x[s] plus at most
    # its immediate neighbour across the (1 − 1e-6) link.
    expected = x.copy()
    odd = np.arange(1, n, 2)
    expected[odd] += np.exp(-1e-6) * x[odd - 1]
    expected[odd - 1] += np.exp(-1e-6) * x[odd]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-250)
