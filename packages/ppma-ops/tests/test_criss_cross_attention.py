"""Native criss-cross polyline attention (torch.ops.ppma.criss_cross_attention) against the
float64 reference op, a hand-written loop oracle, finite differences (gradcheck), opcheck,
torch.compile and the official criss-cross fixture."""

from __future__ import annotations

import numpy as np
import ppma_ops
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ppma_ops import reference


@pytest.fixture(scope="module", autouse=True)
def _native_criss_cross() -> None:
    # A missing kernel is a build failure, not a reason to skip.
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"
    assert hasattr(torch.ops.ppma, "criss_cross_attention_fwd"), "native criss-cross not registered"


DECAY_REGIMES = {
    "uniform": (-3.0, -0.01),
    "near_zero": (-16.0, -12.0),  # decay ≈ 1e-6: each softmax collapses onto the diagonal
    "near_one": (-2e-6, -1e-7),  # decay ≈ 1: the masks vanish, plain softmaxes remain
}


def _log_decays(shape, regime: str, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    lo, hi = DECAY_REGIMES[regime]
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=dtype)


@st.composite
def attention_problems(draw, max_side: int = 7):
    shape = (
        draw(st.integers(1, 2)),  # B
        draw(st.integers(1, 3)),  # heads
        draw(st.integers(1, max_side)),  # H
        draw(st.integers(1, max_side)),  # W
    )
    d = draw(st.sampled_from([8, 16, 32, 64]))
    c = draw(st.sampled_from([d, 5]))  # v may be narrower than q, k
    regime_a = draw(st.sampled_from(sorted(DECAY_REGIMES)))
    regime_b = draw(st.sampled_from(sorted(DECAY_REGIMES)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    k = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    v = torch.randn(*shape, c, generator=gen, dtype=torch.float64)
    la = _log_decays(shape, regime_a, gen)
    lb = _log_decays(shape, regime_b, gen)
    scale = draw(st.sampled_from([d**-0.5, 1.0]))
    return (q, k, v, la, lb), scale


def _native(args, scale):
    return torch.ops.ppma.criss_cross_attention(*args, scale)


def _loop_oracle(q, k, v, la, lb, scale):
    """docs/design.md §2.4 with explicit loops over rows and columns (one image, one head)."""
    hh, ww, _ = q.shape
    ca, cb = np.cumsum(la, axis=1), np.cumsum(lb, axis=0)

    def softmax(s):
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    rows = [
        softmax(scale * q[i] @ k[i].T - np.abs(ca[i][:, None] - ca[i][None, :])) for i in range(hh)
    ]
    cols = [
        softmax(scale * q[:, l] @ k[:, l].T - np.abs(cb[:, l][:, None] - cb[:, l][None, :]))
        for l in range(ww)
    ]

    def apply_rows(x):
        return np.stack([rows[i] @ x[i] for i in range(hh)])

    def apply_cols(x):
        return np.stack([cols[l] @ x[:, l] for l in range(ww)], axis=1)

    return 0.5 * apply_cols(apply_rows(v)) + 0.5 * apply_rows(apply_cols(v))


def _assert_gradients_match(out, expected, args, grad_out):
    """The native output's gradients w.r.t. (q, k, v, log_alpha, log_beta) equal the
    reference output's, for the same upstream gradient."""
    native = torch.autograd.grad(out, args, grad_out)
    wanted = torch.autograd.grad(expected, args, grad_out)
    names = ("q", "k", "v", "log_alpha", "log_beta")
    for name, got, want in zip(names, native, wanted, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@given(problem=attention_problems())
def test_float64_matches_reference(problem):
    args, scale = problem
    torch.testing.assert_close(
        _native(args, scale),
        reference.criss_cross_attention(*args, scale=scale),
        rtol=1e-11,
        atol=1e-11,
    )


@given(problem=attention_problems())
def test_float32_matches_float64_reference(problem):
    args, scale = problem
    expected = reference.criss_cross_attention(*args, scale=scale)
    got = _native([a.float() for a in args], scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)


def test_matches_hand_written_loop_oracle():
    gen = torch.Generator().manual_seed(0)
    shape, d = (1, 1, 3, 4), 8
    q, k, v = (torch.randn(*shape, d, generator=gen, dtype=torch.float64) for _ in range(3))
    la, lb = (_log_decays(shape, "uniform", gen) for _ in range(2))
    scale = d**-0.5
    expected = _loop_oracle(*(t[0, 0].numpy() for t in (q, k, v, la, lb)), scale)
    got = _native((q, k, v, la, lb), scale)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@given(problem=attention_problems(max_side=6))
def test_gradients_match_reference_autograd(problem):
    args, scale = problem
    args = [a.clone().requires_grad_() for a in args]
    out = _native(args, scale)
    expected = reference.criss_cross_attention(*args, scale=scale)
    _assert_gradients_match(out, expected, args, torch.randn_like(out))


@pytest.mark.parametrize("grid", [(9, 19), (20, 8), (3, 17), (1, 33)])
def test_wide_grids_match_reference_values_and_gradients(grid):
    # The CPU kernel handles columns in blocks of 8 (kColumnBlock); the Hypothesis shapes
    # above stay within one block, these span several and end in a ragged one.
    gen = torch.Generator().manual_seed(2)
    shape = (2, 2, *grid)
    q, k = (torch.randn(*shape, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(*shape, 5, generator=gen, dtype=torch.float64)
    la, lb = (_log_decays(shape, "uniform", gen) for _ in range(2))
    args = [t.requires_grad_() for t in (q, k, v, la, lb)]
    out = _native(args, 0.25)
    expected = reference.criss_cross_attention(*args, scale=0.25)
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    _assert_gradients_match(out, expected, args, grad_out)


@pytest.mark.parametrize(
    ("regime", "grid"), [("uniform", (3, 4)), ("near_one", (1, 5)), ("near_zero", (4, 1))]
)
def test_gradcheck_all_inputs(regime, grid):
    gen = torch.Generator().manual_seed(1)
    shape = (1, 1, *grid)
    q, k = (torch.randn(*shape, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(*shape, 3, generator=gen, dtype=torch.float64)
    la, lb = (_log_decays(shape, regime, gen) for _ in range(2))
    args = [t.requires_grad_() for t in (q, k, v, la, lb)]
    eps = 1e-8 if regime == "near_one" else 1e-6  # stay inside log decay ≤ 0
    assert torch.autograd.gradcheck(lambda *a: _native(a, 0.5), args, eps=eps, atol=1e-6)


def test_decays_of_exactly_one_match_the_reference_gradient():
    # log decay 0 makes cumsum differences vanish; like the reference (torch.abs at 0) those
    # pairs contribute no mask gradient.
    args = [a.detach().clone() for a in _small_args(torch.float64)]
    args[3][..., 1:3] = 0.0
    args[4][:, :, 1:, 2] = 0.0
    args = [a.requires_grad_() for a in args]
    out = _native(args, 0.35)
    grad_out = torch.randn_like(out)
    native = torch.autograd.grad(out, args, grad_out)
    expected = torch.autograd.grad(
        reference.criss_cross_attention(*args, scale=0.35), args, grad_out
    )
    for got, want in zip(native, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_first_decays_get_exactly_zero_gradient():
    gen = torch.Generator().manual_seed(2)
    shape = (2, 2, 4, 5)
    args = [torch.randn(*shape, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    args += [_log_decays(shape, "uniform", gen) for _ in range(2)]
    args = [a.requires_grad_() for a in args]
    ga, gb = torch.autograd.grad(_native(args, 0.3).square().sum(), args[3:])
    assert torch.all(ga[..., 0] == 0) and torch.all(gb[..., 0, :] == 0)
    assert ga[..., 1:].abs().max() > 0 and gb[..., 1:, :].abs().max() > 0


def _small_args(dtype, requires_grad=True):
    gen = torch.Generator().manual_seed(3)
    shape = (2, 2, 3, 4)
    args = [torch.randn(*shape, 8, generator=gen, dtype=dtype) for _ in range(2)]
    args.append(torch.randn(*shape, 6, generator=gen, dtype=dtype))
    args += [_log_decays(shape, "uniform", gen, dtype) for _ in range(2)]
    return [a.requires_grad_(requires_grad) for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    args = _small_args(dtype)
    torch.library.opcheck(torch.ops.ppma.criss_cross_attention_fwd, (*args, 0.35))
    torch.library.opcheck(torch.ops.ppma.criss_cross_attention, (*args, 0.35))
    detached = [a.detach() for a in args]
    _, *saved = torch.ops.ppma.criss_cross_attention_fwd(*detached, 0.35)
    grad_out = torch.randn_like(detached[2])
    torch.library.opcheck(
        torch.ops.ppma.criss_cross_attention_backward,
        (grad_out, *detached, *saved, 0.35),
    )


@pytest.mark.usefixtures("no_compile_caches")
def test_compiled_forward_and_backward_match_eager():
    def f(q, k, v, la, lb):
        return ppma_ops.criss_cross_attention(q, k, v, la, lb).tanh()

    eager = _small_args(torch.float32)
    compiled = [a.detach().clone().requires_grad_() for a in eager]
    torch._dynamo.reset()
    f_compiled = torch.compile(f, fullgraph=True)
    y_eager, y_compiled = f(*eager), f_compiled(*compiled)
    torch.testing.assert_close(y_compiled, y_eager)
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b.grad, a.grad)


def _float32_problem(shape, seed):
    """q, k, v (d = 16), log decays, all requiring grad, and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    args = [torch.randn(*shape, 16, generator=gen) for _ in range(3)]
    args += [_log_decays(shape, "uniform", gen, torch.float32) for _ in range(2)]
    return [a.requires_grad_() for a in args], torch.randn(*shape, 16, generator=gen)


def test_backward_is_bitwise_deterministic():
    args, grad_out = _float32_problem((2, 3, 9, 11), seed=4)
    runs = [torch.autograd.grad(_native(args, 0.25), args, grad_out) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_the_thread_count(threads, set_threads):
    # Three heads: one or three threads take whole heads through every phase, two threads
    # split each phase over the lines (the kernel's two schedules); a line's arithmetic must
    # not change with either.
    args, grad_out = _float32_problem((1, 3, 10, 17), seed=5)

    def run():
        out = _native(args, 0.25)
        return (out.detach(), *torch.autograd.grad(out, args, grad_out))

    set_threads(1)
    expected = run()
    set_threads(threads)
    got = run()
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("heads", "threads"), [(3, 1), (3, 2), (4, 2)])
def test_inference_equals_the_training_forward_and_keeps_nothing(heads, threads, set_threads):
    # Without a gradient to compute the public op runs the inference op: per-thread state where
    # threads take whole heads (3 heads on 1 thread, 4 on 2), temporaries otherwise (3 on 2).
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    args, _ = _float32_problem((2, heads, 11, 9), seed=6)
    set_threads(threads)
    with torch.no_grad(), OpLog() as log:
        fast = _native(args, 0.3)
    trained = torch.ops.ppma.criss_cross_attention_fwd(*(a.detach() for a in args), 0.3)[0]
    with OpLog() as grad_log:
        _native(args, 0.3)
    assert torch.equal(fast, trained)
    assert "ppma.criss_cross_attention_inference.default" in log.names
    assert not any("criss_cross_attention_fwd" in name for name in log.names)
    assert "ppma.criss_cross_attention_fwd.default" in grad_log.names
    torch.library.opcheck(
        torch.ops.ppma.criss_cross_attention_inference, (*(a.detach() for a in args), 0.3)
    )


def test_bfloat16_runs_in_float32_and_returns_bfloat16():
    args = [a.detach().bfloat16() for a in _small_args(torch.float64)]
    out = _native(args, 0.35)
    assert out.dtype == torch.bfloat16
    expected = reference.criss_cross_attention(*(a.double() for a in args), scale=0.35)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_clear_errors_for_bad_arguments():
    q, k, v, la, lb = _small_args(torch.float32, requires_grad=False)
    op = torch.ops.ppma.criss_cross_attention
    with pytest.raises(RuntimeError, match="k must have the shape of q"):
        op(q, k[..., :4], v, la, lb, 1.0)
    with pytest.raises(RuntimeError, match="v must have shape"):
        op(q, k, v[:, :, :2], la, lb, 1.0)
    with pytest.raises(RuntimeError, match="log_beta must have shape"):
        op(q, k, v, la, lb[..., :3], 1.0)
    with pytest.raises(RuntimeError, match="v has dtype"):
        op(q, k, v.double(), la, lb, 1.0)
    with pytest.raises(RuntimeError, match="log_alpha must be <= 0"):
        op(q, k, v, la.abs() + 0.5, lb, 1.0)
    with pytest.raises(RuntimeError, match="log_beta contains NaN"):
        op(q, k, v, la, lb.clone().fill_(float("nan")), 1.0)
    with pytest.raises(ValueError, match="log_alpha must be <= 0"):
        ppma_ops.criss_cross_attention(q, k, v, la.abs() + 0.5, lb)


def test_reproduces_the_official_criss_cross_fixture(official_attention):
    y, expected = official_attention(
        "chunk", lambda q, k, v, la, lb: torch.ops.ppma.criss_cross_attention(q, k, v, la, lb, 1.0)
    )
    assert y.dtype == torch.float32
    error = (y - expected).abs().max().item() / expected.abs().max().item()
    assert error <= 1e-5, f"relative error {error:.2e} against the official output"
