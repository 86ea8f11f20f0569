"""Blocked paths and extreme decays (docs/design.md §2.7), every op, native and reference.

A log decay of −inf is a decay of exactly 0: every path through its step has mask entry 0.
The float64 oracles come from ppma_mask, whose masks are built without cumulative sums of
−inf (finite sums and counts of blocked steps), and from ``polyline_mask_direct``, which
multiplies the decay factors one by one. Finite log decays whose row / column sums leave the
accumulation dtype's range are refused with an error naming the argument and the limit. Each
op runs on the CPU and on CUDA.
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
from ppma_ops.testing import (
    DEVICES,
    assert_close_f64,
    attention_inputs,
    cuda_only,
    forward_and_grads,
)

INF = float("inf")
GRAD_NAMES = ("q", "k", "v", "log_alpha", "log_beta")


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


def _on(device, tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(ATTENTION)), problem=blocked_problems())
def test_attention_matches_the_float64_oracle(name, problem, device):
    op, ref, oracle = ATTENTION[name]
    expected = oracle(*problem, 0.5)
    for impl in (op, ref):
        got = impl(*_on(device, problem), scale=0.5).cpu()
        assert not got.isnan().any()
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(ATTENTION)), problem=blocked_problems())
def test_attention_gradients_match_the_reference(name, problem, device):
    op, ref, _ = ATTENTION[name]
    grads = []
    for impl in (op, ref):
        args = [t.clone().to(device).requires_grad_() for t in problem]
        out = impl(*args, scale=0.5)
        gen = torch.Generator().manual_seed(0)
        g = torch.randn(out.shape, generator=gen).double().to(device)
        grads.append([t.cpu() for t in torch.autograd.grad(out, args, g)])
    for label, got, want in zip(GRAD_NAMES, *grads, strict=True):
        assert not got.isnan().any(), label
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=label)
    for blocked, grad in ((problem[3], grads[0][3]), (problem[4], grads[0][4])):
        assert torch.all(grad[blocked == -INF] == 0)  # d/da of e^a·(…) at e^a = 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ATTENTION))
@pytest.mark.parametrize("grid", [(12, 30), (3, 300), (70, 4)])
def test_large_grids_with_whole_tiles_blocked(name, grid, device):
    # Every log_beta −inf: a query reaches only its own grid row through M, so for queries below
    # the first key tiles the running softmax maximum stays −inf for whole tiles.
    op, ref, _ = ATTENTION[name]
    q, k, v, la, _ = _problem((1, 2, *grid), 8, 5, rate=0.05, seed=sum(grid))
    lb = torch.full_like(la, -INF)
    expected = ref(q, k, v, la, lb, scale=0.4)
    got = op(*_on(device, (q, k, v, la, lb)), scale=0.4).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    got32 = op(*(t.to(device, torch.float32) for t in (q, k, v, la, lb)), scale=0.4)
    # float32 cumsums of up to 300 steps of ~1.5 hold the log mask to ~1e-4 absolute
    torch.testing.assert_close(got32.double().cpu(), expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ATTENTION))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_matches_the_float64_oracle(name, dtype, tol, device):
    op, _, oracle = ATTENTION[name]
    args = [t.to(dtype) for t in _problem((2, 2, 5, 7), 16, 16, rate=0.3, seed=1)]
    expected = oracle(*(t.double() for t in args), 0.25)
    got = op(*_on(device, args), scale=0.25)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_gradcheck_with_blocked_steps(name, device):
    op, _, _ = ATTENTION[name]
    problem = _problem((1, 1, 3, 4), 4, 3, rate=0.3, seed=2)
    args = [t.to(device).requires_grad_() for t in problem]
    assert (args[3] == -INF).any() and (args[4] == -INF).any()
    assert torch.autograd.gradcheck(lambda *a: op(*a, scale=0.5), args, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_a_blocked_first_step_changes_nothing(name, device):
    # α[:, 0] and β[0, :] never enter the mask, not even as a decay of 0.
    op, _, _ = ATTENTION[name]
    q, k, v, la, lb = _on(device, _problem((1, 2, 4, 5), 8, 8, rate=0.0, seed=3))
    la0, lb0 = la.clone(), lb.clone()
    la0[..., 0] = -INF
    lb0[..., 0, :] = -INF
    torch.testing.assert_close(op(q, k, v, la0, lb0), op(q, k, v, la, lb), rtol=0, atol=0)
    la0[..., 0] = -1e30  # a huge finite one neither: it is left out of the sums
    lb0[..., 0, :] = -1e30
    torch.testing.assert_close(op(q, k, v, la0, lb0), op(q, k, v, la, lb), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_fully_blocked_grid_attends_to_itself(name, device):
    op, ref, _ = ATTENTION[name]
    q, k, v, _, _ = _on(device, _problem((1, 2, 3, 4), 8, 5, rate=0.0, seed=4))
    blocked = torch.full(q.shape[:4], -INF, dtype=torch.float64, device=device)
    for impl in (op, ref):
        torch.testing.assert_close(impl(q, k, v, blocked, blocked), v, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------ scan


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(problem=blocked_problems(), transpose=st.booleans())
def test_scan_matches_ppma_mask(problem, transpose, device):
    _, _, x, la, lb = problem
    path = "h2v" if transpose else "v2h"
    for impl in (ppma_ops.polyline_scan, reference.polyline_scan):
        y = impl(*_on(device, (x, la, lb)), transpose=transpose).cpu()
        for (bi, hi), (xh,) in _heads(x):
            expected = ppma_mask.apply_mask(
                la[bi, hi].numpy(), lb[bi, hi].numpy(), xh, path=path, method="dense"
            )
            np.testing.assert_allclose(
                y[bi, hi].reshape(expected.shape), expected, rtol=1e-11, atol=1e-11
            )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=15, deadline=None)
@given(problem=blocked_problems(max_side=5), transpose=st.booleans())
def test_scan_gradients_match_the_reference(problem, transpose, device):
    _, _, x, la, lb = problem
    grads = []
    for impl in (ppma_ops.polyline_scan, reference.polyline_scan):
        args = [t.clone().to(device).requires_grad_() for t in (x, la, lb)]
        y = impl(*args, transpose=transpose)
        grads.append([g.cpu() for g in torch.autograd.grad(y, args, torch.ones_like(y))])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.all(grads[0][1][la == -INF] == 0) and torch.all(grads[0][2][lb == -INF] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_carries_an_infinite_value_to_every_token(transpose, dtype, device):
    # Every mask entry is positive: L·x is +inf wherever x has one +inf and otherwise finite
    # entries (the scan once formed F + G − x, which is inf − inf at the +inf token itself).
    x = torch.randn(1, 1, 4, 5, 2, dtype=dtype)
    x[0, 0, 1, 2, 0] = INF
    la, lb = -torch.rand(1, 1, 4, 5, dtype=dtype), -torch.rand(1, 1, 4, 5, dtype=dtype)
    x, la, lb = _on(device, (x, la, lb))
    for impl in (ppma_ops.polyline_scan, reference.polyline_scan):
        y = impl(x, la, lb, transpose=transpose)
        assert torch.all(y[..., 0] == INF)
        assert torch.isfinite(y[..., 1]).all()
    x[0, 0, 3, 0, 0] = -INF  # opposite infinities meet everywhere: inf − inf
    assert torch.isnan(ppma_ops.polyline_scan(x, la, lb, transpose=transpose)[..., 0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transpose", [False, True])
def test_scan_with_underflowing_decays_matches_the_reference(transpose, device):
    # Log decays below float32's exp range: e^a is 0 in the float32 scan, which then blocks
    # like a decay of exactly 0, and those mask entries are below 1e-86 in float64.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, 6, 3, generator=gen)
    la, lb = (-3 * torch.rand(1, 2, 5, 6, generator=gen) for _ in range(2))
    la[0, :, 2, 3] = -300.0
    lb[0, 1, 3, :] = -200.0
    expected = reference.polyline_scan(x.double(), la.double(), lb.double(), transpose=transpose)
    got = ppma_ops.polyline_scan(*_on(device, (x, la, lb)), transpose=transpose)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=1e-5)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PUBLIC_OPS))
@pytest.mark.parametrize("dim, arg", [(-1, "log_alpha"), (-2, "log_beta")])
def test_overflowing_float32_sums_are_refused_by_name(name, dim, arg, device):
    la, lb = _on(device, _overflowing(torch.float32, dim))
    q = torch.randn(1, 2, 3, 4, 8, device=device)
    # CPU tensors are always checked; CUDA tensors when asked for (a device sync per call).
    with ppma_ops.use_value_checks(device == "cuda"):
        with pytest.raises(
            ValueError, match=rf"^{arg}: .*sum below -3\.403e\+38, the torch\.float32"
        ):
            PUBLIC_OPS[name](q, la, lb)
    la[la == -3e38] = -INF  # a decay of exactly 0 is what such decays amount to
    lb[lb == -3e38] = -INF
    assert torch.isfinite(PUBLIC_OPS[name](q, la, lb)).all()


@pytest.mark.parametrize("op", ["polyline_attention", "criss_cross_attention"])
def test_both_backends_refuse_overflowing_sums(op):
    # Values are checked once per call, by the public function, whichever backend runs.
    la, lb = _overflowing(torch.float32, -2)
    q = torch.randn(1, 2, 3, 4, 8)
    for backend in ppma_ops.BACKENDS:
        with ppma_ops.use_backend(backend):
            with pytest.raises(
                ValueError, match=r"log_beta: the finite log decays of a column sum"
            ):
                PUBLIC_OPS[op](q, la, lb)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_sums_of_float32_sized_decays_are_fine(device):
    la, lb = _overflowing(torch.float64, -1)
    q = torch.randn(1, 2, 3, 4, 8, dtype=torch.float64)
    got = ppma_ops.polyline_attention(*_on(device, (q, q, q, la, lb)), scale=0.3).cpu()
    torch.testing.assert_close(got, _vanilla_oracle(q, q, q, la, lb, 0.3), rtol=1e-10, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_huge_but_summable_decays_pass_validation(device):
    # −1e38 per step stays inside float32 over the 3 steps that count (the first log decay of
    # a row never enters the mask, nor the sums): validation must not refuse it.
    la = torch.full((1, 1, 2, 4), -1e38)
    la[..., 0] = -INF
    lb = -torch.rand(1, 1, 2, 4)
    q = torch.randn(1, 1, 2, 4, 4)
    expected = _vanilla_oracle(*(t.double() for t in (q, q, q, la, lb)), 0.5)
    with ppma_ops.use_value_checks():
        got = ppma_ops.polyline_attention(*_on(device, (q, q, q, la, lb)), scale=0.5)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=1e-5)


def test_nan_and_positive_log_decays_are_still_refused():
    q = torch.randn(1, 1, 2, 3, 4)
    la, lb = -torch.rand(1, 1, 2, 3), -torch.rand(1, 1, 2, 3)
    # CPU tensors are always checked: the switch only adds other devices.
    with ppma_ops.use_value_checks(False):
        with pytest.raises(ValueError, match="log_alpha contains NaN"):
            ppma_ops.polyline_attention(q, q, q, la.clone().fill_(float("nan")), lb)
        with pytest.raises(ValueError, match="log_beta must be <= 0"):
            ppma_ops.criss_cross_attention(q, q, q, la, lb.clone().fill_(INF))


# ------------------------------------------------------------------------- CUDA only


@cuda_only
def test_cuda_values_are_checked_only_when_asked_for():
    q = torch.randn(1, 1, 2, 3, 4, device="cuda")
    la, lb = -torch.rand(1, 1, 2, 3, device="cuda"), -torch.rand(1, 1, 2, 3, device="cuda")
    nan = la.clone().fill_(float("nan"))
    with ppma_ops.use_value_checks(False):
        assert ppma_ops.polyline_attention(q, q, q, nan, lb).isnan().all()  # no device sync
    with ppma_ops.use_value_checks(), pytest.raises(ValueError, match="log_alpha contains NaN"):
        ppma_ops.polyline_attention(q, q, q, nan, lb)


def _cut(inputs, seed: int, rate: float = 0.3):
    """Some log decays set to −inf (decays of 0, docs/design.md §2.7)."""
    gen = torch.Generator().manual_seed(seed)
    *qkv, la, lb = inputs

    def cut(t: torch.Tensor) -> torch.Tensor:
        hit = torch.rand(t.shape, generator=gen) < rate
        return t.masked_fill(hit.to(t.device), -INF)

    return (*qkv, cut(la), cut(lb))


@cuda_only
@pytest.mark.parametrize("name", sorted(ATTENTION))
@pytest.mark.parametrize("shape", [(2, 2, 6, 9, 16, 16), (1, 1, 3, 80, 8, 8), (1, 1, 40, 4, 8, 8)])
def test_cuda_attention_with_blocked_paths_matches_reference(name, shape):
    # Heads with −inf log decays take the counted (blocked) mask; heads without, the plain one.
    op, ref, _ = ATTENTION[name]
    b, heads, h, w, d, c = shape
    inputs = _cut(attention_inputs((b, heads, h, w), d, c, seed=11, device="cuda"), seed=12)
    out, grads = forward_and_grads(op, inputs)
    ref_out, ref_grads = forward_and_grads(ref, inputs)
    assert not out.isnan().any()
    assert_close_f64(out, ref_out, atol=1e-10, rtol=1e-9, what="out")
    for label, g, rg in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert_close_f64(g, rg, atol=1e-9, rtol=1e-8, what=f"d{label}")


@cuda_only
def test_cuda_polyline_attention_with_every_vertical_step_blocked():
    # A query then reaches only its own grid row through M: its first key tiles are all
    # blocked, and the running softmax maximum stays −inf across them.
    q, k, v, la, lb = attention_inputs((1, 2, 12, 30), 8, 8, seed=13, device="cuda")
    lb = torch.full_like(lb, -INF)
    out = ppma_ops.polyline_attention(q, k, v, la, lb)
    expected = reference.polyline_attention(q, k, v, la, lb)
    assert_close_f64(out, expected, atol=1e-10, rtol=1e-9, what="out")


@cuda_only
@pytest.mark.parametrize("transpose", [False, True])
def test_cuda_scan_with_blocked_paths_and_infinite_values(transpose):
    _, _, x, la, lb = _cut(attention_inputs((2, 2, 5, 7), 1, 3, seed=14, device="cuda"), 15)
    y = ppma_ops.polyline_scan(x, la, lb, transpose=transpose)
    expected = reference.polyline_scan(x, la, lb, transpose=transpose)
    assert_close_f64(y, expected, atol=1e-11, rtol=1e-11, what="y")
    _, _, x, la, lb = attention_inputs((1, 1, 4, 5), 1, 2, seed=16, dtype=torch.float32,
                                       device="cuda")  # fmt: skip
    x[0, 0, 1, 2, 0] = INF  # every mask entry is positive: +inf reaches every token
    y = ppma_ops.polyline_scan(x, la, lb, transpose=transpose)
    assert torch.all(y[..., 0] == INF) and torch.isfinite(y[..., 1]).all()
