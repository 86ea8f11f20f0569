"""Blocked paths and extreme decays (docs/design.md §2.7), every op, native and reference.

A log decay of −inf is a decay of exactly 0: every path through its step has mask entry 0.
The float64 oracles come from ppma_mask, whose masks are built without cumulative sums of
−inf (finite sums and counts of blocked steps), and from ``polyline_mask_direct``, which
multiplies the decay factors one by one. Finite log decays whose row / column sums leave the
accumulation dtype's range are refused with an error naming the argument and the limit.
"""

from __future__ import annotations

import numpy as np
import ppma_mask
import ppma_ops
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ppma_ops import reference

INF = float("inf")


@pytest.fixture(scope="module", autouse=True)
def _native_ops() -> None:
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"


def _block(t: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    return t.masked_fill(torch.rand(t.shape, generator=gen, dtype=torch.float64) < rate, -INF)


def _problem(shape, d, c, rate, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(*shape, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(*shape, c, generator=gen, dtype=torch.float64)
    la, lb = (_block(-3 * torch.rand(shape, generator=gen, dtype=torch.float64), rate, gen)
              for _ in range(2))  # fmt: skip
    return [q, k, v, la, lb]


@st.composite
def blocked_problems(draw, max_side: int = 7):
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, max_side)),
        draw(st.integers(1, max_side)),
    )
    d = draw(st.sampled_from([4, 16]))
    rate = draw(st.sampled_from([0.1, 0.3, 0.7, 1.0]))
    return _problem(shape, d, draw(st.sampled_from([d, 3])), rate, draw(st.integers(0, 2**31)))


def _heads(*tensors):
    """Yields (b, h) and each tensor's (H·W, …) float64 numpy slice."""
    b, heads, h, w = tensors[0].shape[:4]
    for bi in range(b):
        for hi in range(heads):
            yield (bi, hi), [t[bi, hi].reshape(h * w, -1).squeeze(-1).numpy() for t in tensors]


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _vanilla_oracle(q, k, v, la, lb, scale):
    out = np.empty((*q.shape[:4], v.shape[-1]))
    for (bi, hi), (qh, kh, vh) in _heads(q, k, v):
        m = ppma_mask.log_polyline_mask(la[bi, hi].numpy(), lb[bi, hi].numpy())
        s = scale * qh @ kh.T
        attn = 0.5 * _softmax(s + m) + 0.5 * _softmax(s + m.T)
        out[bi, hi] = (attn @ vh).reshape(*q.shape[2:4], -1)
    return torch.from_numpy(out)


def _line_attention(q, k, x, log_decays, scale):
    """softmax(scale·q kᵀ + log mask_1d) x along one line (ppma_mask's 1-D mask)."""
    return _softmax(scale * q @ k.T + ppma_mask.log_mask_1d(log_decays)) @ x


def _rows(q, k, x, log_alpha, scale):
    """R(x): every grid row of one head through its row attention, (H, W, ·) arrays."""
    lines = zip(q, k, x, log_alpha, strict=True)
    return np.stack([_line_attention(*line, scale) for line in lines])


def _criss_cross_oracle(q, k, v, la, lb, scale):
    q, k, v, la, lb = (t.numpy() for t in (q, k, v, la, lb))
    out = np.empty((*q.shape[:4], v.shape[-1]))
    for bi, hi in np.ndindex(q.shape[:2]):
        qh, kh, vh, a, b = (t[bi, hi] for t in (q, k, v, la, lb))

        def rows(x, qh=qh, kh=kh, a=a):
            return _rows(qh, kh, x, a, scale)

        def cols(x, qh=qh, kh=kh, b=b):  # Cc(x): the rows of the transposed grid
            t = (qh.swapaxes(0, 1), kh.swapaxes(0, 1), x.swapaxes(0, 1), b.T)
            return _rows(*t, scale).swapaxes(0, 1)

        out[bi, hi] = 0.5 * cols(rows(vh)) + 0.5 * rows(cols(vh))
    return torch.from_numpy(out)


ATTENTION = {
    "polyline_attention": (ppma_ops.polyline_attention, reference.polyline_attention,
                           _vanilla_oracle),
    "criss_cross_attention": (ppma_ops.criss_cross_attention, reference.criss_cross_attention,
                              _criss_cross_oracle),
}  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(ATTENTION)), problem=blocked_problems())
def test_attention_matches_the_float64_oracle(name, problem):
    op, ref, oracle = ATTENTION[name]
    expected = oracle(*problem, 0.5)
    for impl in (op, ref):
        got = impl(*problem, scale=0.5)
        assert not got.isnan().any()
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(ATTENTION)), problem=blocked_problems())
def test_attention_gradients_match_the_reference(name, problem):
    op, ref, _ = ATTENTION[name]
    grads = []
    for impl in (op, ref):
        args = [t.clone().requires_grad_() for t in problem]
        out = impl(*args, scale=0.5)
        gen = torch.Generator().manual_seed(0)
        grads.append(torch.autograd.grad(out, args, torch.randn(out.shape, generator=gen).double()))
    for label, got, want in zip(("q", "k", "v", "log_alpha", "log_beta"), *grads, strict=True):
        assert not got.isnan().any(), label
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=label)
    for blocked, grad in ((problem[3], grads[0][3]), (problem[4], grads[0][4])):
        assert torch.all(grad[blocked == -INF] == 0)  # d/da of e^a·(…) at e^a = 0


@pytest.mark.parametrize("name", sorted(ATTENTION))
@pytest.mark.parametrize("grid", [(12, 30), (3, 300), (70, 4)])
def test_large_grids_with_whole_tiles_blocked(name, grid):
    # Every log_beta −inf: a query reaches only its own grid row through M, so for queries below
    # the first key tiles the running softmax maximum stays −inf for whole tiles.
    op, ref, _ = ATTENTION[name]
    q, k, v, la, _ = _problem((1, 2, *grid), 8, 5, rate=0.05, seed=sum(grid))
    lb = torch.full_like(la, -INF)
    expected = ref(q, k, v, la, lb, scale=0.4)
    got = op(q, k, v, la, lb, scale=0.4)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    got32 = op(*(t.float() for t in (q, k, v, la, lb)), scale=0.4)
    # float32 cumsums of up to 300 steps of ~1.5 hold the log mask to ~1e-4 absolute
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", sorted(ATTENTION))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_matches_the_float64_oracle(name, dtype, tol):
    op, _, oracle = ATTENTION[name]
    args = [t.to(dtype) for t in _problem((2, 2, 5, 7), 16, 16, rate=0.3, seed=1)]
    expected = oracle(*(t.double() for t in args), 0.25)
    got = op(*args, scale=0.25)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_gradcheck_with_blocked_steps(name):
    op, _, _ = ATTENTION[name]
    args = [t.requires_grad_() for t in _problem((1, 1, 3, 4), 4, 3, rate=0.3, seed=2)]
    assert (args[3] == -INF).any() and (args[4] == -INF).any()
    assert torch.autograd.gradcheck(lambda *a: op(*a, scale=0.5), args, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_a_blocked_first_step_changes_nothing(name):
    # α[:, 0] and β[0, :] never enter the mask, not even as a decay of 0.
    op, _, _ = ATTENTION[name]
    q, k, v, la, lb = _problem((1, 2, 4, 5), 8, 8, rate=0.0, seed=3)
    la0, lb0 = la.clone(), lb.clone()
    la0[..., 0] = -INF
    lb0[..., 0, :] = -INF
    torch.testing.assert_close(op(q, k, v, la0, lb0), op(q, k, v, la, lb), rtol=0, atol=0)
    la0[..., 0] = -1e30  # a huge finite one neither: it is left out of the sums
    lb0[..., 0, :] = -1e30
    torch.testing.assert_close(op(q, k, v, la0, lb0), op(q, k, v, la, lb), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_fully_blocked_grid_attends_to_itself(name):
    op, ref, _ = ATTENTION[name]
    q, k, v, _, _ = _problem((1, 2, 3, 4), 8, 5, rate=0.0, seed=4)
    blocked = torch.full(q.shape[:4], -INF, dtype=torch.float64)
    for impl in (op, ref):
        torch.testing.assert_close(impl(q, k, v, blocked, blocked), v, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------ scan


@settings(max_examples=25, deadline=None)
@given(problem=blocked_problems(), transpose=st.booleans())
def test_scan_matches_ppma_mask(problem, transpose):
    _, _, x, la, lb = problem
    path = "h2v" if transpose else "v2h"
    for impl in (ppma_ops.polyline_scan, reference.polyline_scan):
        y = impl(x, la, lb, transpose=transpose)
        for (bi, hi), (xh,) in _heads(x):
            expected = ppma_mask.apply_mask(
                la[bi, hi].numpy(), lb[bi, hi].numpy(), xh, path=path, method="dense"
            )
            np.testing.assert_allclose(
                y[bi, hi].reshape(expected.shape), expected, rtol=1e-11, atol=1e-11
            )


@settings(max_examples=15, deadline=None)
@given(problem=blocked_problems(max_side=5), transpose=st.booleans())
def test_scan_gradients_match_the_reference(problem, transpose):
    _, _, x, la, lb = problem
    grads = []
    for impl in (ppma_ops.polyline_scan, reference.polyline_scan):
        args = [t.clone().requires_grad_() for t in (x, la, lb)]
        y = impl(*args, transpose=transpose)
        grads.append(torch.autograd.grad(y, args, torch.ones_like(y)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.all(grads[0][1][la == -INF] == 0) and torch.all(grads[0][2][lb == -INF] == 0)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_carries_an_infinite_value_to_every_token(transpose, dtype):
    # Every mask entry is positive: L·x is +inf wherever x has one +inf and otherwise finite
    # entries (the scan once formed F + G − x, which is inf − inf at the +inf token itself).
    x = torch.randn(1, 1, 4, 5, 2, dtype=dtype)
    x[0, 0, 1, 2, 0] = INF
    la, lb = -torch.rand(1, 1, 4, 5, dtype=dtype), -torch.rand(1, 1, 4, 5, dtype=dtype)
    for impl in (ppma_ops.polyline_scan, reference.polyline_scan):
        y = impl(x, la, lb, transpose=transpose)
        assert torch.all(y[..., 0] == INF)
        assert torch.isfinite(y[..., 1]).all()
    x[0, 0, 3, 0, 0] = -INF  # opposite infinities meet everywhere: inf − inf
    assert torch.isnan(ppma_ops.polyline_scan(x, la, lb, transpose=transpose)[..., 0]).all()


@pytest.mark.parametrize("transpose", [False, True])
def test_scan_with_underflowing_decays_matches_the_reference(transpose):
    # Log decays below float32's exp range: e^a is 0 in the float32 scan, which then blocks
    # like a decay of exactly 0, and those mask entries are below 1e-86 in float64.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, 6, 3, generator=gen)
    la, lb = (-3 * torch.rand(1, 2, 5, 6, generator=gen) for _ in range(2))
    la[0, :, 2, 3] = -300.0
    lb[0, 1, 3, :] = -200.0
    expected = reference.polyline_scan(x.double(), la.double(), lb.double(), transpose=transpose)
    got = ppma_ops.polyline_scan(x, la, lb, transpose=transpose)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- extreme decays


def _overflowing(dtype, dim):
    la = -torch.rand(1, 2, 3, 4, dtype=dtype)
    lb = -torch.rand(1, 2, 3, 4, dtype=dtype)
    target = la if dim == -1 else lb
    target.narrow(dim, 1, 2).fill_(-3e38)  # two steps of one line: −6e38 < −3.4e38
    return la, lb


PUBLIC_OPS = {
    "polyline_attention": lambda q, la, lb: ppma_ops.polyline_attention(q, q, q, la, lb),
    "criss_cross_attention": lambda q, la, lb: ppma_ops.criss_cross_attention(q, q, q, la, lb),
    "polyline_scan": lambda q, la, lb: ppma_ops.polyline_scan(q, la, lb),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_OPS))
@pytest.mark.parametrize("dim, arg", [(-1, "log_alpha"), (-2, "log_beta")])
def test_overflowing_float32_sums_are_refused_by_name(name, dim, arg):
    la, lb = _overflowing(torch.float32, dim)
    q = torch.randn(1, 2, 3, 4, 8)
    with pytest.raises(ValueError, match=rf"^{arg}: .*sum below -3\.403e\+38, the torch\.float32"):
        PUBLIC_OPS[name](q, la, lb)
    la[la == -3e38] = -INF  # a decay of exactly 0 is what such decays amount to
    lb[lb == -3e38] = -INF
    assert torch.isfinite(PUBLIC_OPS[name](q, la, lb)).all()


@pytest.mark.parametrize("op", ["polyline_attention_fwd", "criss_cross_attention_fwd"])
def test_native_ops_refuse_overflowing_sums_too(op):
    la, lb = _overflowing(torch.float32, -2)
    q = torch.randn(1, 2, 3, 4, 8)
    with pytest.raises(RuntimeError, match=r"log_beta: the finite log decays of a column sum"):
        getattr(torch.ops.ppma, op)(q, q, q, la, lb, 1.0)


def test_float64_sums_of_float32_sized_decays_are_fine():
    la, lb = _overflowing(torch.float64, -1)
    q = torch.randn(1, 2, 3, 4, 8, dtype=torch.float64)
    got = ppma_ops.polyline_attention(q, q, q, la, lb, scale=0.3)
    torch.testing.assert_close(got, _vanilla_oracle(q, q, q, la, lb, 0.3), rtol=1e-10, atol=0)


def test_huge_but_summable_decays_pass_validation():
    # −1e38 per step stays inside float32 over the 3 steps that count (the first log decay of
    # a row never enters the mask, nor the sums): validation must not refuse it.
    la = torch.full((1, 1, 2, 4), -1e38)
    la[..., 0] = -INF
    lb = -torch.rand(1, 1, 2, 4)
    q = torch.randn(1, 1, 2, 4, 4)
    expected = _vanilla_oracle(*(t.double() for t in (q, q, q, la, lb)), 0.5)
    got = ppma_ops.polyline_attention(q, q, q, la, lb, scale=0.5)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_nan_and_positive_log_decays_are_still_refused():
    q = torch.randn(1, 1, 2, 3, 4)
    la, lb = -torch.rand(1, 1, 2, 3), -torch.rand(1, 1, 2, 3)
    with pytest.raises(ValueError, match="log_alpha contains NaN"):
        ppma_ops.polyline_attention(q, q, q, la.clone().fill_(float("nan")), lb)
    with pytest.raises(ValueError, match="log_beta must be <= 0"):
        ppma_ops.criss_cross_attention(q, q, q, la, lb.clone().fill_(INF))
