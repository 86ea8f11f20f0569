"""apply_mask: dense, factored (Algorithm 1) and scan give the same L·x, Lᵀ·x, (L + Lᵀ)·x."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ppma_mask import apply_mask, mask_1d, polyline_mask
from ppma_mask.testing import assert_products_close, grids, right_hand_sides

METHODS = ("dense", "factored", "scan")
PATHS = ("v2h", "h2v", "sum")


@st.composite
def grids_and_rhs(draw, vector=None, max_side=12):
    log_alpha, log_beta = draw(grids(max_side=max_side))
    return log_alpha, log_beta, draw(right_hand_sides(log_alpha.size, vector=vector))


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "matrix"])
@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_all_methods_equal_the_mask_times_x(vector, path, data):
    log_alpha, log_beta, x = data.draw(grids_and_rhs(vector=vector))
    mask = polyline_mask(log_alpha, log_beta, path=path)
    expected = mask @ x
    scale = np.abs(mask) @ np.abs(x)
    for method in METHODS:
        y = apply_mask(log_alpha, log_beta, x, path=path, method=method)
        assert y.shape == x.shape
        assert_products_close(y, expected, scale)


@given(grids_and_rhs(), st.sampled_from(METHODS))
def test_h2v_product_is_transposed_mask_product(case, method):
    log_alpha, log_beta, x = case
    mask_t = polyline_mask(log_alpha, log_beta).T
    assert_products_close(
        apply_mask(log_alpha, log_beta, x, path="h2v", method=method),
        mask_t @ x,
        np.abs(mask_t) @ np.abs(x),
    )


@given(grids_and_rhs(), st.sampled_from(METHODS), st.sampled_from(PATHS))
def test_degenerate_grids_apply_the_1d_mask(case, method, path):
    log_alpha, log_beta, _ = case
    factor = 2.0 if path == "sum" else 1.0
    row_alpha, row_beta = log_alpha[:1], log_beta[:1]  # H = 1: only α of row 0 matters
    x_row = np.linspace(-1.0, 1.0, row_alpha.size)
    m = factor * mask_1d(row_alpha[0])
    assert_products_close(
        apply_mask(row_alpha, row_beta, x_row, path=path, method=method),
        m @ x_row,
        m @ np.abs(x_row),
    )
    col_alpha, col_beta = log_alpha[:, :1], log_beta[:, :1]  # W = 1: only β of column 0
    x_col = np.linspace(-1.0, 1.0, col_beta.size)
    m = factor * mask_1d(col_beta[:, 0])
    assert_products_close(
        apply_mask(col_alpha, col_beta, x_col, path=path, method=method),
        m @ x_col,
        m @ np.abs(x_col),
    )


@given(grids_and_rhs(), st.sampled_from(METHODS), st.sampled_from(PATHS))
def test_first_column_alpha_and_first_row_beta_do_not_change_the_product(case, method, path):
    log_alpha, log_beta, x = case
    changed_alpha, changed_beta = log_alpha.copy(), log_beta.copy()
    changed_alpha[:, 0] = -7.0
    changed_beta[0, :] = -1e-3
    np.testing.assert_array_equal(
        apply_mask(changed_alpha, changed_beta, x, path=path, method=method),
        apply_mask(log_alpha, log_beta, x, path=path, method=method),
    )


def test_scan_handles_a_grid_larger_than_dense_would_allow():
    """A 160×160 grid (N = 25,600; the dense mask would take 5.2 GB): scan and factored agree."""
    rng = np.random.default_rng(1)
    log_alpha = -rng.uniform(1e-3, 3.0, (160, 160))
    log_beta = -rng.uniform(1e-3, 3.0, (160, 160))
    x = rng.standard_normal((160 * 160, 2))
    y_scan = apply_mask(log_alpha, log_beta, x, path="sum", method="scan")
    y_factored = apply_mask(log_alpha, log_beta, x, path="sum", method="factored")
    np.testing.assert_allclose(y_scan, y_factored, rtol=1e-10, atol=1e-10)
