"""The 2-D polyline mask against its definition and the identities of docs/design.md §1."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from ppma_mask import (
    cumulative_log_decays,
    fold,
    log_mask_1d,
    log_polyline_mask,
    manhattan_mask,
    mask_1d,
    polyline_mask,
    polyline_mask_direct,
    unfold,
)
from ppma_mask.testing import LOG_DECAY_MAX, LOG_DECAY_MIN, grids, log_decays

paths = st.sampled_from(["v2h", "h2v", "sum"])
log_decay_scalars = st.floats(LOG_DECAY_MIN, LOG_DECAY_MAX)


@given(grids(max_side=10))
def test_cumsum_form_matches_product_definition(decays):
    log_alpha, log_beta = decays
    np.testing.assert_allclose(
        polyline_mask(log_alpha, log_beta), polyline_mask_direct(log_alpha, log_beta), rtol=1e-11
    )


@given(grids())
def test_design_formula_with_plain_cumsums_matches(decays):
    """log L = −|Ca[i,j] − Ca[i,l]| − |Cb[i,l] − Cb[k,l]| with NumPy's ordinary cumsums (which
    include the first entry) gives the same mask; the tables returned drop that entry."""
    log_alpha, log_beta = decays
    height, width = log_alpha.shape
    ca, cb = np.cumsum(log_alpha, axis=1), np.cumsum(log_beta, axis=0)
    i, j, k, l = np.indices((height, width, height, width))
    log_l = -np.abs(ca[i, j] - ca[i, l]) - np.abs(cb[i, l] - cb[k, l])
    np.testing.assert_allclose(
        polyline_mask(log_alpha, log_beta), np.exp(log_l).reshape(height * width, -1), rtol=1e-11
    )
    ca_table, cb_table = cumulative_log_decays(log_alpha, log_beta)
    np.testing.assert_allclose(ca_table, ca - ca[:, :1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cb_table, cb - cb[:1, :], rtol=1e-12, atol=1e-12)


@given(grids())
def test_entries_in_unit_interval_with_unit_diagonal(decays):
    for path in ("v2h", "h2v"):
        mask = polyline_mask(*decays, path=path)
        assert np.all(mask > 0) and np.all(mask <= 1)
        np.testing.assert_array_equal(np.diag(mask), 1.0)
    combined = polyline_mask(*decays, path="sum")
    assert np.all(combined > 0) and np.all(combined <= 2)
    np.testing.assert_array_equal(np.diag(combined), 2.0)


@given(grids())
def test_h2v_is_the_other_polyline_and_equals_the_transpose(decays):
    """h2v from its own definition (horizontal leg in the key's row k, vertical leg in the
    query's column j) equals the transpose of v2h; "sum" is their sum."""
    log_alpha, log_beta = decays
    height, width = log_alpha.shape
    rows = [mask_1d(log_alpha[i]) for i in range(height)]  # A_k[j, l]
    columns = [mask_1d(log_beta[:, j]) for j in range(width)]  # B_j[i, k]
    other = np.empty((height, width, height, width))
    for i in range(height):
        for j in range(width):
            for k in range(height):
                other[i, j, k, :] = rows[k][j, :] * columns[j][i, k]
    v2h = polyline_mask(log_alpha, log_beta, path="v2h")
    h2v = polyline_mask(log_alpha, log_beta, path="h2v")
    np.testing.assert_allclose(unfold(other), h2v, rtol=1e-12)
    np.testing.assert_array_equal(h2v, v2h.T)
    np.testing.assert_array_equal(polyline_mask(log_alpha, log_beta, path="sum"), v2h + v2h.T)


@given(grids(), paths)
def test_log_mask_is_the_log_of_the_mask(decays, path):
    np.testing.assert_allclose(
        np.exp(log_polyline_mask(*decays, path=path)), polyline_mask(*decays, path=path), rtol=1e-12
    )


@given(grids())
def test_path_additivity_through_the_corner(decays):
    """log L[(i,j),(k,l)] = log L[(i,j),(i,l)] + log L[(i,l),(k,l)]: the horizontal leg (a pure
    row path) plus the vertical leg (a pure column path), which are the 1-D masks."""
    log_alpha, log_beta = decays
    height, width = log_alpha.shape
    t = fold(log_polyline_mask(log_alpha, log_beta), height, width)
    i, j, k, l = np.indices(t.shape)
    horizontal = t[i, j, i, l]
    vertical = t[i, l, k, l]
    np.testing.assert_allclose(t, horizontal + vertical, rtol=1e-12, atol=1e-12)
    for row in range(height):
        np.testing.assert_allclose(
            t[row, :, row, :], log_mask_1d(log_alpha[row]), rtol=1e-12, atol=1e-12
        )
    for col in range(width):
        np.testing.assert_allclose(
            t[:, col, :, col], log_mask_1d(log_beta[:, col]), rtol=1e-12, atol=1e-12
        )


@given(grids(), st.data())
def test_first_column_alpha_and_first_row_beta_have_no_effect(decays, data):
    log_alpha, log_beta = decays
    height, width = log_alpha.shape
    changed_alpha, changed_beta = log_alpha.copy(), log_beta.copy()
    changed_alpha[:, 0] = data.draw(log_decays((height,)))
    changed_beta[0, :] = data.draw(log_decays((width,)))
    for path in ("v2h", "h2v", "sum"):
        np.testing.assert_array_equal(
            polyline_mask(changed_alpha, changed_beta, path=path),
            polyline_mask(log_alpha, log_beta, path=path),
        )


@given(st.integers(1, 12), st.integers(1, 12), log_decay_scalars, log_decay_scalars)
def test_constant_decays_give_the_manhattan_mask(height, width, a, b):
    mask = polyline_mask(np.full((height, width), a), np.full((height, width), b))
    np.testing.assert_allclose(mask, manhattan_mask(height, width, a, b), rtol=1e-11)
    i, j, k, l = np.indices((height, width, height, width))
    explicit = np.exp(a * np.abs(j - l) + b * np.abs(i - k)).reshape(mask.shape)
    np.testing.assert_allclose(manhattan_mask(height, width, a, b), explicit, rtol=1e-13)


@given(st.integers(1, 12), st.integers(1, 12), log_decay_scalars)
def test_equal_constant_decays_give_rmt_decay(height, width, log_gamma):
    i, j, k, l = np.indices((height, width, height, width))
    rmt = np.exp(log_gamma * (np.abs(i - k) + np.abs(j - l))).reshape(height * width, -1)
    for path in ("v2h", "h2v"):
        mask = polyline_mask(
            np.full((height, width), log_gamma), np.full((height, width), log_gamma), path=path
        )
        np.testing.assert_allclose(mask, rmt, rtol=1e-11)


@given(grids(), paths)
def test_single_row_grid_is_the_row_mask(decays, path):
    log_alpha, log_beta = decays[0][:1], decays[1][:1]
    expected = mask_1d(log_alpha[0]) * (2.0 if path == "sum" else 1.0)
    np.testing.assert_allclose(polyline_mask(log_alpha, log_beta, path=path), expected, rtol=1e-13)


@given(grids(), paths)
def test_single_column_grid_is_the_column_mask(decays, path):
    log_alpha, log_beta = decays[0][:, :1], decays[1][:, :1]
    expected = mask_1d(log_beta[:, 0]) * (2.0 if path == "sum" else 1.0)
    np.testing.assert_allclose(polyline_mask(log_alpha, log_beta, path=path), expected, rtol=1e-13)


@given(grids(max_side=6))
def test_fold_indexes_tokens_row_major_and_unfold_inverts_it(decays):
    mask = polyline_mask(*decays)
    height, width = decays[0].shape
    tensor = fold(mask, height, width)
    assert tensor.shape == (height, width, height, width)
    for i, j, k, l in np.ndindex(tensor.shape):
        assert tensor[i, j, k, l] == mask[i * width + j, k * width + l]
    np.testing.assert_array_equal(unfold(tensor), mask)
