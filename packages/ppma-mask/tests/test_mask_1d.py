"""1-D masks: symmetry, the Mamba2 lower triangle, semiseparability, path splitting."""

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from ppma_mask import causal_mask_1d, log_mask_1d, mask_1d
from ppma_mask.testing import log_decays

sequences = st.integers(1, 16).flatmap(lambda n: log_decays((n,)))


def product_definition_1d(log_a: np.ndarray) -> np.ndarray:
    """M[s, t] = Π_{min < r ≤ max} α_r, multiplied factor by factor."""
    alpha = np.exp(log_a).tolist()
    n = len(alpha)
    return np.array(
        [[math.prod(alpha[min(s, t) + 1 : max(s, t) + 1]) for t in range(n)] for s in range(n)]
    )


@given(sequences)
def test_mask_1d_matches_product_definition(log_a):
    np.testing.assert_allclose(mask_1d(log_a), product_definition_1d(log_a), rtol=1e-11, atol=0)


@given(sequences)
def test_mask_1d_is_symmetric_with_unit_diagonal_in_unit_interval(log_a):
    m = mask_1d(log_a)
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(np.diag(m), 1.0)
    assert np.all(m > 0) and np.all(m <= 1)


@given(sequences)
def test_symmetric_mask_is_tril_plus_its_transpose_minus_identity(log_a):
    lower = causal_mask_1d(log_a)
    np.testing.assert_array_equal(np.triu(lower, 1), 0.0)
    np.testing.assert_array_equal(mask_1d(log_a), lower + lower.T - np.eye(len(log_a)))


@given(sequences)
def test_causal_mask_has_vanishing_2x2_minors_inside_lower_triangle(log_a):
    """Every submatrix taken inside the lower triangle has rank ≤ 1 (Mamba2's 1-semiseparable).

    Rank ≤ 1 ⇔ every 2×2 minor vanishes: rows s1 < s2, columns t1 < t2 ≤ s1.
    """
    m = causal_mask_1d(log_a)
    n = len(log_a)
    s1, s2, t1, t2 = np.meshgrid(*[np.arange(n)] * 4, indexing="ij")
    inside = (s1 < s2) & (t1 < t2) & (t2 <= s1)
    diagonal_term = m[s1, t1] * m[s2, t2]
    anti_term = m[s1, t2] * m[s2, t1]
    minor = diagonal_term - anti_term
    assert np.all(np.abs(minor[inside]) <= 1e-12 * (diagonal_term[inside] + anti_term[inside]))


@given(sequences)
def test_causal_mask_maximal_lower_blocks_have_rank_one(log_a):
    m = causal_mask_1d(log_a)
    n = len(log_a)
    for k in range(n):
        block = m[k:, : k + 1]  # the largest block inside the lower triangle with corner (k, k)
        singular = np.linalg.svd(block, compute_uv=False)
        assert np.linalg.matrix_rank(block, tol=1e-10 * singular[0]) == 1


@given(sequences)
def test_log_mask_splits_at_any_intermediate_position(log_a):
    """α(j..l) = α(j..m) · α(m..l) for j ≤ m ≤ l: log entries add along the path."""
    log_m = log_mask_1d(log_a)
    n = len(log_a)
    j, m, l = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    between = (j <= m) & (m <= l)
    lhs = log_m[j, l][between]
    rhs = (log_m[j, m] + log_m[m, l])[between]
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@given(sequences, st.floats(-13.0, 0.0))
def test_first_decay_never_enters_1d_mask(log_a, replacement):
    changed = log_a.copy()
    changed[0] = replacement
    np.testing.assert_array_equal(mask_1d(changed), mask_1d(log_a))
