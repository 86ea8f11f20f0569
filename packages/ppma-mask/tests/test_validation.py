"""Bad input raises ValueError whose message names the offending argument."""

import numpy as np
import ppma_mask as pm
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ppma_mask.testing import grids

A = -np.full((3, 4), 0.5)  # valid log_alpha / log_beta for a 3×4 grid
X = np.ones((12, 2))
Q = np.ones((12, 3))


def with_entry(array, value, index=(1, 2)):
    changed = np.array(array, dtype=float)
    changed[index] = value
    return changed


BAD_CALLS = {
    # shapes
    "alpha 1-D": (lambda: pm.polyline_mask(A[0], A[0]), "log_alpha"),
    "alpha empty": (lambda: pm.polyline_mask(np.zeros((0, 3)), np.zeros((0, 3))), "log_alpha"),
    "beta shape": (lambda: pm.polyline_mask(A, A[:, :3]), "log_beta"),
    "x length": (lambda: pm.apply_mask(A, A, np.ones(11)), "x"),
    "x 3-D": (lambda: pm.apply_mask(A, A, np.ones((12, 2, 1))), "x"),
    "q rows": (lambda: pm.masked_linear_attention(Q[:5], Q, X, A, A), "q"),
    "k shape": (lambda: pm.masked_linear_attention(Q, Q[:, :2], X, A, A), "k"),
    "v length": (lambda: pm.masked_linear_attention(Q, Q, X[:5], A, A), "v"),
    "fold shape": (lambda: pm.fold(np.ones((12, 11)), 3, 4), "M"),
    "fold H": (lambda: pm.fold(np.ones((12, 12)), 0, 4), "H"),
    "unfold shape": (lambda: pm.unfold(np.ones((3, 4, 4, 3))), "T"),
    "manhattan W": (lambda: pm.manhattan_mask(3, 2.5, -1.0, -1.0), "W"),
    "mask_1d 2-D": (lambda: pm.mask_1d(A), "log_a"),
    "mask_1d empty": (lambda: pm.causal_mask_1d([]), "log_a"),
    "scan x": (lambda: pm.causal_scan(A[0], np.ones(3)), "x"),
    "ssm b": (lambda: pm.mamba2_recurrence(A[0], np.ones((3, 2)), np.ones((4, 2)), A[0]), "b"),
    "ssm c": (lambda: pm.mamba2_recurrence(A[0], np.ones((4, 2)), np.ones((4, 1)), A[0]), "c"),
    "factors beta": (lambda: pm.factors(A, A.T), "log_beta"),
    # values
    "alpha positive": (lambda: pm.polyline_mask(with_entry(A, 1e-9), A), "log_alpha"),
    "beta positive": (lambda: pm.apply_mask(A, with_entry(A, 0.1), X), "log_beta"),
    "alpha NaN": (lambda: pm.log_polyline_mask(with_entry(A, np.nan), A), "log_alpha"),
    "beta +inf": (lambda: pm.factors(A, with_entry(A, np.inf)), "log_beta"),
    "x NaN": (lambda: pm.apply_mask(A, A, with_entry(X, np.nan, (3, 1))), "x"),
    "x inf": (lambda: pm.symmetric_scan(A[0], with_entry(np.ones(4), np.inf, 2)), "x"),
    "q inf": (lambda: pm.masked_linear_attention(with_entry(Q, np.inf), Q, X, A, A), "q"),
    "log_a positive": (lambda: pm.mask_1d([-1.0, 2.0]), "log_a"),
    "gamma positive": (lambda: pm.manhattan_mask(3, 4, 0.5, -1.0), "log_gamma_row"),
    "gamma NaN": (lambda: pm.manhattan_mask(3, 4, -0.5, np.nan), "log_gamma_col"),
    "alpha complex": (lambda: pm.polyline_mask(A + 0j, A), "log_alpha"),
    "alpha text": (lambda: pm.polyline_mask([["a", "b"]], [[0.0, 0.0]]), "log_alpha"),
    # options
    "path": (lambda: pm.apply_mask(A, A, X, path="diagonal"), "path"),
    "method": (lambda: pm.apply_mask(A, A, X, method="fft"), "method"),
    "mask path": (lambda: pm.polyline_mask(A, A, path="V2H"), "path"),
}


@pytest.mark.parametrize("call, argument", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        call()


@given(grids(), st.data())
def test_any_positive_or_non_finite_decay_is_rejected(decays, data):
    name = data.draw(st.sampled_from(["log_alpha", "log_beta"]))
    arrays = dict(zip(["log_alpha", "log_beta"], decays, strict=True))
    target = arrays[name].copy()
    index = tuple(data.draw(st.integers(0, n - 1)) for n in target.shape)
    target[index] = data.draw(
        st.one_of(st.floats(min_value=1e-300, allow_infinity=True), st.just(np.nan))
    )
    arrays[name] = target
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        pm.apply_mask(arrays["log_alpha"], arrays["log_beta"], np.ones(target.size))


def test_minus_infinite_log_decay_is_accepted_and_blocks():
    """log α = −inf (α = 0) is the other boundary: the step it sits on is blocked."""
    mask = pm.mask_1d([-0.5, -np.inf, -0.5])
    np.testing.assert_array_equal(mask, [[1, 0, 0], [0, 1, np.exp(-0.5)], [0, np.exp(-0.5), 1]])


def test_zero_log_decay_is_accepted_and_gives_no_decay():
    """log α = 0 (α = 1) lies on the boundary of the domain and is valid."""
    np.testing.assert_array_equal(pm.polyline_mask(np.zeros((2, 3)), np.zeros((2, 3))), 1.0)


def test_inputs_are_not_modified():
    log_alpha, log_beta, x = A.copy(), A.copy(), X.copy()
    for method in ("dense", "factored", "scan"):
        pm.apply_mask(log_alpha, log_beta, x, path="sum", method=method)
    np.testing.assert_array_equal(log_alpha, A)
    np.testing.assert_array_equal(log_beta, A)
    np.testing.assert_array_equal(x, X)
