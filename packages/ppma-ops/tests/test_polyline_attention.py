"""Native vanilla polyline attention (torch.ops.ppma.polyline_attention) against the float64
reference op, the ppma_mask float64 mask, finite differences (gradcheck), opcheck,
torch.compile, the official attention fixture, and a peak-memory bound (no N×N buffer)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import ppma_mask
import ppma_ops
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ppma_ops import reference


@pytest.fixture(scope="module", autouse=True)
def _native_polyline_attention() -> None:
    # A missing kernel is a build failure, not a reason to skip.
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"
    assert hasattr(torch.ops.ppma, "polyline_attention_fwd"), "native vanilla op not registered"


LOG_DECAY_RANGES = {
    "uniform": (-3.0, -0.01),
    "near_zero": (np.log(1e-6), np.log(1e-4)),  # decay ≈ 1e-6…1e-4: masks collapse to the diagonal
    "near_one": (-2e-6, -1e-6),  # decay ≈ 1: the masks vanish, plain softmaxes remain
}


def _log_decays(shape, regime: str, gen: torch.Generator) -> torch.Tensor:
    lo, hi = LOG_DECAY_RANGES[regime]
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _problem(shape, d, c, regimes=("uniform", "uniform"), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    k = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    v = torch.randn(*shape, c, generator=gen, dtype=torch.float64)
    la = _log_decays(shape, regimes[0], gen)
    lb = _log_decays(shape, regimes[1], gen)
    return [t.to(dtype) for t in (q, k, v, la, lb)]


@st.composite
def attention_problems(draw, max_side: int = 9):
    shape = (
        draw(st.integers(1, 2)),  # B
        draw(st.integers(1, 3)),  # heads
        draw(st.integers(1, max_side)),  # H
        draw(st.integers(1, max_side)),  # W
    )
    d = draw(st.sampled_from([8, 16, 32, 64]))
    c = draw(st.sampled_from([d, 5]))  # v may be narrower than q, k
    regimes = (
        draw(st.sampled_from(sorted(LOG_DECAY_RANGES))),
        draw(st.sampled_from(sorted(LOG_DECAY_RANGES))),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([d**-0.5, 1.0]))
    return _problem(shape, d, c, regimes, seed), scale


def _mask_oracle(q, k, v, la, lb, scale):
    """Float64 attention with the log-mask from ppma_mask (independent of ppma_ops)."""
    b, heads, h, w, _ = q.shape
    out = torch.empty(*q.shape[:4], v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(heads):
            m = torch.from_numpy(
                ppma_mask.log_polyline_mask(la[bi, hi].numpy(), lb[bi, hi].numpy(), path="v2h")
            )
            s = scale * q[bi, hi].reshape(h * w, -1) @ k[bi, hi].reshape(h * w, -1).T
            attn = 0.5 * torch.softmax(s + m, -1) + 0.5 * torch.softmax(s + m.T, -1)
            out[bi, hi] = (attn @ v[bi, hi].reshape(h * w, -1)).reshape(h, w, -1)
    return out


def _native(q, k, v, la, lb, scale):
    return torch.ops.ppma.polyline_attention(q, k, v, la, lb, scale)


def _grads(fn, inputs, scale, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, scale=scale) if fn is reference.polyline_attention else fn(*leaves, scale)
    return out, torch.autograd.grad(out, leaves, grad_out)


@settings(max_examples=30, deadline=None)
@given(attention_problems())
def test_forward_matches_reference_and_ppma_mask(problem) -> None:
    (q, k, v, la, lb), scale = problem
    out = _native(q, k, v, la, lb, scale)
    torch.testing.assert_close(out, _mask_oracle(q, k, v, la, lb, scale), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        out, reference.polyline_attention(q, k, v, la, lb, scale=scale), rtol=1e-10, atol=1e-10
    )


@settings(max_examples=20, deadline=None)
@given(attention_problems())
def test_backward_matches_reference(problem) -> None:
    (q, k, v, la, lb), scale = problem
    grad_out = torch.randn(*q.shape[:4], v.shape[-1], dtype=torch.float64)
    _, native = _grads(_native, (q, k, v, la, lb), scale, grad_out)
    _, ref = _grads(reference.polyline_attention, (q, k, v, la, lb), scale, grad_out)
    for name, a, b in zip(("q", "k", "v", "log_alpha", "log_beta"), native, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


# Grids whose rows are split across tiles (W above the 64/128/256-token tile targets) or whose
# tiles hold many short rows: the tiling paths a 9×9 Hypothesis grid never reaches.
@pytest.mark.parametrize("grid", [(2, 150), (1, 300), (70, 3), (9, 70), (300, 1), (3, 130)])
def test_large_and_split_row_tiles(grid) -> None:
    q, k, v, la, lb = _problem((1, 2, *grid), 8, 6, seed=sum(grid))
    grad_out = torch.randn(*q.shape[:4], 6, dtype=torch.float64)
    out, native = _grads(_native, (q, k, v, la, lb), 0.4, grad_out)
    ref_out, ref = _grads(reference.polyline_attention, (q, k, v, la, lb), 0.4, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("q", "k", "v", "log_alpha", "log_beta"), native, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_against_float64_reference(dtype, tol) -> None:
    q, k, v, la, lb = _problem((2, 2, 6, 11), 32, 32, ("near_zero", "uniform"), seed=3)
    grad_out = torch.randn(*q.shape[:4], 32, dtype=torch.float64)
    ref_out, ref = _grads(reference.polyline_attention, (q, k, v, la, lb), 0.3, grad_out)
    low = [t.to(dtype) for t in (q, k, v, la, lb)]
    out, native = _grads(_native, low, 0.3, grad_out.to(dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in native)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    for a, b in zip(native, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=10 * tol, atol=10 * tol * b.abs().max())


@pytest.mark.parametrize("grid", [(3, 4), (5, 1), (1, 6)])
def test_gradcheck_all_inputs(grid) -> None:
    inputs = [
        t.requires_grad_(True) for t in _problem((1, 2, *grid), 8, 5, seed=grid[0] * 7 + grid[1])
    ]
    assert torch.autograd.gradcheck(lambda *x: _native(*x, 0.5), inputs, eps=1e-6, atol=1e-7)


def test_zero_log_decays_use_abs_subgradient() -> None:
    # Decays of exactly 1 make cumsum differences vanish: the gradient convention must be
    # torch.abs's (0 at 0), as in the reference.
    q, k, v, la, lb = _problem((1, 2, 4, 5), 8, 8, seed=11)
    la[..., 1:3] = 0.0
    lb[:, :, 2] = 0.0
    grad_out = torch.randn(1, 2, 4, 5, 8, dtype=torch.float64)
    _, native = _grads(_native, (q, k, v, la, lb), 0.5, grad_out)
    _, ref = _grads(reference.polyline_attention, (q, k, v, la, lb), 0.5, grad_out)
    for a, b in zip(native, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_opcheck() -> None:
    q, k, v, la, lb = _problem((2, 2, 3, 5), 8, 6, seed=5)
    args = [t.requires_grad_(True) for t in (q, k, v, la, lb)]
    torch.library.opcheck(torch.ops.ppma.polyline_attention_fwd.default, (*args, 0.5))
    torch.library.opcheck(torch.ops.ppma.polyline_attention.default, (*args, 0.5))
    out, parts, lse = torch.ops.ppma.polyline_attention_fwd(*(t.detach() for t in args), 0.5)
    torch.library.opcheck(
        torch.ops.ppma.polyline_attention_backward.default,
        (torch.randn_like(out), *(t.detach() for t in args), parts, lse, 0.5),
    )


def test_torch_compile_fullgraph_forward_and_backward() -> None:
    q, k, v, la, lb = _problem((1, 2, 4, 6), 8, 8, seed=9, dtype=torch.float32)

    def loss(q, k, v, la, lb):
        return (ppma_ops.polyline_attention(q, k, v, la, lb) * v).sin().sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_in = [t.clone().requires_grad_(True) for t in (q, k, v, la, lb)]
    comp_in = [t.clone().requires_grad_(True) for t in (q, k, v, la, lb)]
    eager = loss(*eager_in)
    comp = compiled(*comp_in)
    torch.testing.assert_close(comp, eager)
    for a, b in zip(
        torch.autograd.grad(comp, comp_in), torch.autograd.grad(eager, eager_in), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_official_attention_fixture(official_attention, dtype, tol) -> None:
    y, expected = official_attention(
        "whole",
        lambda q, k, v, la, lb: torch.ops.ppma.polyline_attention(q, k, v, la, lb, 1.0),
        dtype,
    )
    assert y.shape == expected.shape
    rel = ((y - expected).abs().max() / expected.abs().max()).item()
    assert rel < tol, f"relative error {rel:.2e} against the official fixture"


def test_invalid_arguments_raise_clear_errors() -> None:
    q, k, v, la, lb = _problem((1, 2, 3, 4), 8, 8)
    ops = (ppma_ops.polyline_attention, lambda *a: torch.ops.ppma.polyline_attention(*a, 0.5))
    for op in ops:
        with pytest.raises((ValueError, RuntimeError), match="k"):
            op(q, k[..., :4], v, la, lb)
        with pytest.raises((ValueError, RuntimeError), match="v"):
            op(q, k, v[:, :, :2], la, lb)
        with pytest.raises((ValueError, RuntimeError), match="log_beta"):
            op(q, k, v, la, lb[..., :3])
        with pytest.raises((TypeError, RuntimeError), match="v"):
            op(q, k, v.float(), la, lb)
        with pytest.raises((ValueError, RuntimeError), match="log_alpha"):
            op(q, k, v, la.abs(), lb)
        with pytest.raises((ValueError, RuntimeError), match="log_beta"):
            op(q, k, v, la, lb.clone().fill_(float("nan")))
        with pytest.raises((ValueError, RuntimeError), match="k"):
            op(q, k.to("meta"), v, la, lb)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        torch.ops.ppma.polyline_attention(*(t.half() for t in (q, k, v, la, lb)), 0.5)


def test_backward_is_deterministic() -> None:
    assert torch.get_num_threads() >= 1
    q, k, v, la, lb = _problem((2, 2, 9, 70), 16, 16, seed=2, dtype=torch.float32)
    grad_out = torch.randn(2, 2, 9, 70, 16)
    _, first = _grads(_native, (q, k, v, la, lb), 0.25, grad_out)
    _, second = _grads(_native, (q, k, v, la, lb), 0.25, grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


_PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, ppma_ops

    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    def peak_growth_kib(fn):
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (peak RSS) to VmRSS
        before = rss_kib("VmRSS:")
        fn()
        return rss_kib("VmHWM:") - before

    h, w = 64, 128
    n = h * w
    q, k, v = (torch.randn(1, 1, h, w, 8, requires_grad=True) for _ in range(3))
    la, lb = (-torch.rand(1, 1, h, w) * 0.1 for _ in range(2))
    la.requires_grad_(True); lb.requires_grad_(True)
    small = [t[:, :, :4, :4].detach().clone().requires_grad_(True) for t in (q, k, v, la, lb)]
    ppma_ops.polyline_attention(*small).sum().backward()  # warm up

    def native():
        ppma_ops.polyline_attention(q, k, v, la, lb).sum().backward()

    def dense():  # the control: one N×N float32 buffer, which the check must catch
        torch.ones(n, n).sum()

    print(peak_growth_kib(native), peak_growth_kib(dense), n * n * 4 // 1024)
    """
)


def test_no_n_by_n_buffer_in_forward_or_backward() -> None:
    # Peak RSS growth of one fwd+bwd at N = 8192 tokens (an N×N float32 buffer is 256 MiB),
    # in a fresh process; the control allocation of one N×N buffer must be seen.
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT], capture_output=True, text=True, check=True
    )
    native_kib, dense_kib, nn_kib = (int(x) for x in result.stdout.split())
    assert dense_kib > 0.9 * nn_kib, "the peak-RSS probe did not see the control N×N buffer"
    assert native_kib < nn_kib / 16, f"native fwd+bwd grew peak RSS by {native_kib} KiB"


def test_kernels_run_on_all_torch_threads() -> None:
    # at::parallel_for is a header template: compiled without OpenMP it silently runs serially.
    from ppma_ops import _native

    assert _native._C.parallel_threads_used() == torch.get_num_threads()
    info = _native._C.build_info()
    assert info["openmp"] and info["cpu_isa"] in info["compiled_cpu_isas"].split()
