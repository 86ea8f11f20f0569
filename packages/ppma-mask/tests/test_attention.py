"""Theorem 3: masked linear attention through a mask product equals ((q kᵀ) ⊙ M) v."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ppma_mask import masked_linear_attention, polyline_mask
from ppma_mask.testing import assert_products_close, grids, right_hand_sides


@st.composite
def attention_cases(draw):
    log_alpha, log_beta = draw(grids(max_side=10))
    n = log_alpha.size
    d = draw(st.integers(1, 4))
    elements = st.floats(-10.0, 10.0)
    q = draw(hnp.arrays(np.float64, (n, d), elements=elements))
    k = draw(hnp.arrays(np.float64, (n, d), elements=elements))
    v = draw(right_hand_sides(n, max_channels=3))
    return q, k, v, log_alpha, log_beta


@given(
    attention_cases(),
    st.sampled_from(["v2h", "h2v", "sum"]),
    st.sampled_from(["dense", "factored", "scan"]),
)
def test_masked_linear_attention_equals_direct_formula(case, path, method):
    q, k, v, log_alpha, log_beta = case
    mask = polyline_mask(log_alpha, log_beta, path=path)
    expected = ((q @ k.T) * mask) @ v
    scale = ((np.abs(q) @ np.abs(k).T) * mask) @ np.abs(v)
    y = masked_linear_attention(q, k, v, log_alpha, log_beta, path=path, method=method)
    assert y.shape == v.shape
    assert_products_close(y, expected, scale)
