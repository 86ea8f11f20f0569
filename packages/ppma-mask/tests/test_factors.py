"""Theorem 1: L = L_H · L_V = L̂_H ⊙ L̂_V and Lᵀ = L_V · L_H."""

import numpy as np
import scipy.sparse as sp
from hypothesis import given
from ppma_mask import (
    broadcast_factors,
    column_masks,
    factors,
    fold,
    mask_1d,
    polyline_mask,
    row_masks,
)
from ppma_mask.testing import grids


@given(grids())
def test_mask_is_product_of_sparse_factors(decays):
    l_h, l_v = factors(*decays)
    np.testing.assert_allclose((l_h @ l_v).toarray(), polyline_mask(*decays), rtol=1e-12)


@given(grids())
def test_transpose_is_reversed_product_of_factors(decays):
    l_h, l_v = factors(*decays)
    np.testing.assert_allclose(
        (l_v @ l_h).toarray(), polyline_mask(*decays, path="h2v"), rtol=1e-12
    )


@given(grids())
def test_mask_is_elementwise_product_of_broadcast_factors(decays):
    l_h_hat, l_v_hat = broadcast_factors(*decays)
    np.testing.assert_allclose(l_h_hat * l_v_hat, polyline_mask(*decays), rtol=1e-12)


@given(grids())
def test_factors_are_the_row_and_column_masks_in_their_places(decays):
    """L_H = blockdiag(A_0..A_{H-1}) and [L_V]_{(i,j),(k,l)} = δ_jl [B_l]_{i,k}, stored sparsely."""
    log_alpha, log_beta = decays
    height, width = log_alpha.shape
    l_h, l_v = factors(log_alpha, log_beta)
    assert sp.issparse(l_h) and sp.issparse(l_v)
    assert l_h.nnz == height * width**2 and l_v.nnz == width * height**2

    expected_h = np.zeros((height, width, height, width))
    expected_v = np.zeros((height, width, height, width))
    for i in range(height):
        expected_h[i, :, i, :] = mask_1d(log_alpha[i])
    for l in range(width):
        expected_v[:, l, :, l] = mask_1d(log_beta[:, l])
    np.testing.assert_allclose(fold(l_h.toarray(), height, width), expected_h, rtol=1e-13)
    np.testing.assert_allclose(fold(l_v.toarray(), height, width), expected_v, rtol=1e-13)

    stacked_rows = row_masks(log_alpha)
    stacked_columns = column_masks(log_beta)
    for i in range(height):
        np.testing.assert_array_equal(stacked_rows[i], expected_h[i, :, i, :])
    for l in range(width):
        np.testing.assert_array_equal(stacked_columns[l], expected_v[:, l, :, l])
