"""The native polyline scan y = L·x / Lᵀ·x (torch.ops.ppma.polyline_scan) against independent
oracles: ppma_mask's dense float64 mask, the materialising reference op, the closed-form
constant-decay (Manhattan) mask, adjointness, finite differences (gradcheck) and opcheck, on the
CPU and on CUDA."""

from __future__ import annotations

import numpy as np
import ppma_mask
import ppma_ops
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ppma_ops import reference
from ppma_ops.testing import (
    DECAY_REGIMES,
    DEVICES,
    assert_close_f64,
    assert_compiled_matches_eager,
    cuda_only,
    forward_and_grads,
    log_decays,
    sample_inputs,
)


@pytest.fixture(scope="module", autouse=True)
def _native_scan() -> None:
    # A missing kernel is a build failure, not a reason to skip.
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"
    assert hasattr(torch.ops.ppma, "polyline_scan"), "torch.ops.ppma.polyline_scan not registered"


def _log_decays(shape, regime: str, seed: int, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return log_decays(shape, regime, generator=gen, dtype=dtype, device=device)


@st.composite
def scan_problems(draw):
    shape = (
        draw(st.integers(1, 2)),  # B
        draw(st.integers(1, 2)),  # heads
        draw(st.integers(1, 7)),  # H
        draw(st.integers(1, 7)),  # W
    )
    c = draw(st.sampled_from([1, 3, 8, 16]))
    regimes = (
        draw(st.sampled_from(sorted(DECAY_REGIMES))),
        draw(st.sampled_from(sorted(DECAY_REGIMES))),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, c, generator=gen, dtype=torch.float64)
    la = _log_decays(shape, regimes[0], seed + 1)
    lb = _log_decays(shape, regimes[1], seed + 2)
    return x, la, lb


def _scan(x, la, lb, transpose):
    return torch.ops.ppma.polyline_scan(x, la, lb, transpose)


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@given(problem=scan_problems(), transpose=st.booleans())
def test_float64_matches_ppma_mask_dense(problem, transpose, device):
    x, la, lb = problem
    y = _scan(*_on(device, x, la, lb), transpose).cpu()
    path = "h2v" if transpose else "v2h"
    b, h, hh, ww, c = x.shape
    for bi in range(b):
        for hi in range(h):
            expected = ppma_mask.apply_mask(
                la[bi, hi].numpy(),
                lb[bi, hi].numpy(),
                x[bi, hi].reshape(hh * ww, c).numpy(),
                path=path,
                method="dense",
            )
            np.testing.assert_allclose(
                y[bi, hi].reshape(hh * ww, c).numpy(), expected, rtol=1e-11, atol=1e-11
            )


@pytest.mark.parametrize("device", DEVICES)
@given(problem=scan_problems(), transpose=st.booleans())
def test_float32_matches_float64_reference(problem, transpose, device):
    x, la, lb = problem
    expected = reference.polyline_scan(x, la, lb, transpose=transpose)
    y = _scan(*(t.to(device, torch.float32) for t in (x, la, lb)), transpose)
    assert y.dtype == torch.float32
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(y.double().cpu(), expected, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("device", DEVICES)
@given(problem=scan_problems(), transpose=st.booleans())
def test_gradients_match_reference_autograd(problem, transpose, device):
    x, la, lb = (t.clone().requires_grad_() for t in problem)
    on_device = [t.detach().to(device).requires_grad_() for t in (x, la, lb)]
    grad_y = torch.randn_like(x)
    native = torch.autograd.grad(_scan(*on_device, transpose), on_device, grad_y.to(device))
    expected = torch.autograd.grad(
        reference.polyline_scan(x, la, lb, transpose=transpose), (x, la, lb), grad_y
    )
    for name, got, want in zip(("x", "log_alpha", "log_beta"), native, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transpose", [False, True])
def test_constant_decays_give_the_manhattan_mask(transpose, device):
    # α ≡ a, β ≡ b: L[(i,j),(k,l)] = a^|j−l| · b^|i−k|, symmetric, so L and Lᵀ agree.
    hh, ww, c, a, b = 5, 6, 4, 0.7, 0.4
    x = torch.randn(1, 1, hh, ww, c, dtype=torch.float64)
    la = torch.full((1, 1, hh, ww), np.log(a), dtype=torch.float64)
    lb = torch.full((1, 1, hh, ww), np.log(b), dtype=torch.float64)
    i, j = np.divmod(np.arange(hh * ww), ww)
    mask = a ** np.abs(j[:, None] - j[None, :]) * b ** np.abs(i[:, None] - i[None, :])
    expected = mask @ x.reshape(hh * ww, c).numpy()
    y = _scan(*_on(device, x, la, lb), transpose).cpu()
    np.testing.assert_allclose(y.reshape(hh * ww, c).numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 9), (1, 1, 9, 1), (2, 1, 1, 1)])
def test_degenerate_grids_are_one_dimensional_masks(shape, device):
    # H = 1: L = A_0; W = 1: L = B_0 (docs/design.md §1); a single token is the identity.
    x = torch.randn(*shape, 3, dtype=torch.float64)
    la, lb = _log_decays(shape, "uniform", 1), _log_decays(shape, "uniform", 2)
    line = la if shape[2] == 1 else lb  # the decays along the line that exists
    steps = line.reshape(shape[0], -1)
    n = steps.shape[1]
    y = _scan(*_on(device, x, la, lb), False).cpu()
    for bi in range(shape[0]):
        cum = torch.cumsum(steps[bi], 0)
        mask = torch.exp(-(cum[:, None] - cum[None, :]).abs())
        expected = mask @ x[bi].reshape(n, 3)
        torch.testing.assert_close(y[bi].reshape(n, 3), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@given(problem=scan_problems())
def test_transpose_is_the_adjoint(problem, device):
    x, la, lb = _on(device, *problem)
    y = torch.randn_like(x)
    lhs = (_scan(x, la, lb, False) * y).sum()
    rhs = (x * _scan(y, la, lb, True)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_first_decays_get_exactly_zero_gradient(device):
    # α[:, 0] and β[0, :] never enter the mask.
    shape = (2, 2, 4, 5)
    x = torch.randn(*shape, 3, dtype=torch.float64, device=device)
    la = _log_decays(shape, "uniform", 3, device=device).requires_grad_()
    lb = _log_decays(shape, "uniform", 4, device=device).requires_grad_()
    for transpose in (False, True):
        ga, gb = torch.autograd.grad(_scan(x, la, lb, transpose).square().sum(), (la, lb))
        assert torch.all(ga[..., 0] == 0) and torch.all(gb[..., 0, :] == 0)
        assert ga[..., 1:].abs().max() > 0 and gb[..., 1:, :].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("regime", ["uniform", "near_one", "near_zero"])
def test_gradcheck_all_inputs(transpose, regime, device):
    shape = (1, 2, 3, 4)
    x = torch.randn(*shape, 2, dtype=torch.float64, device=device, requires_grad=True)
    la = _log_decays(shape, regime, 5, device=device).requires_grad_()
    lb = _log_decays(shape, regime, 6, device=device).requires_grad_()
    # near_one sits within 2e-6 of log decay 0; keep the finite-difference step inside (−∞, 0].
    eps = 1e-8 if regime == "near_one" else 1e-6
    assert torch.autograd.gradcheck(
        lambda *a: _scan(*a, transpose), (x, la, lb), eps=eps, atol=1e-6
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        for x, la, lb, transpose in sample_inputs(device, dtype=dtype, requires_grad=True)[
            "polyline_scan"
        ]:
            torch.library.opcheck(torch.ops.ppma.polyline_scan, (x, la, lb, transpose))
            torch.library.opcheck(
                torch.ops.ppma._polyline_scan_bwd,
                (torch.randn_like(x), x.detach(), la.detach(), lb.detach(), transpose),
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.usefixtures("no_compile_caches")
def test_compiled_forward_and_backward_match_eager(device):
    def f(x, la, lb):
        return ppma_ops.polyline_scan(x, la, lb) + ppma_ops.polyline_scan(x, la, lb, transpose=True)

    shape = (1, 2, 4, 5)
    args = [
        torch.randn(*shape, 3, device=device),
        _log_decays(shape, "uniform", 9, torch.float32, device),
        _log_decays(shape, "uniform", 10, torch.float32, device),
    ]
    assert_compiled_matches_eager(f, args)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bitwise_deterministic(device):
    shape = (2, 3, 12, 13)
    x = torch.randn(*shape, 8, device=device, requires_grad=True)
    la = _log_decays(shape, "uniform", 11, torch.float32, device).requires_grad_()
    lb = _log_decays(shape, "uniform", 12, torch.float32, device).requires_grad_()
    grad_y = torch.randn_like(x)
    runs = [torch.autograd.grad(_scan(x, la, lb, False), (x, la, lb), grad_y) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_runs_in_float32_and_returns_bfloat16(device):
    shape = (1, 1, 4, 4)
    x = torch.randn(*shape, 8, dtype=torch.float64)
    la, lb = _log_decays(shape, "uniform", 13), _log_decays(shape, "uniform", 14)
    y = _scan(*(t.to(device, torch.bfloat16) for t in (x, la, lb)), False)
    assert y.dtype == torch.bfloat16
    expected = reference.polyline_scan(
        x.bfloat16().double(), la.bfloat16().double(), lb.bfloat16().double()
    )
    torch.testing.assert_close(y.double().cpu(), expected, rtol=2e-2, atol=2e-2)


def test_clear_errors_for_bad_arguments():
    shape = (1, 1, 3, 4)
    x = torch.randn(*shape, 2)
    la, lb = -torch.rand(shape), -torch.rand(shape)
    with pytest.raises(RuntimeError, match="log_beta must have shape"):
        torch.ops.ppma.polyline_scan(x, la, lb[..., :3], False)
    with pytest.raises(RuntimeError, match="log_alpha has dtype"):
        torch.ops.ppma.polyline_scan(x, la.double(), lb, False)
    with pytest.raises(RuntimeError, match="x must have shape"):
        torch.ops.ppma.polyline_scan(x[0], la, lb, False)
    # Values are checked once, by the public function (ppma_ops.value_checks), on the native
    # and the reference backend alike; the native op checks shapes, dtypes and devices.
    for backend in ppma_ops.BACKENDS:
        with ppma_ops.use_backend(backend):
            with pytest.raises(ValueError, match="log_beta must be <= 0"):
                ppma_ops.polyline_scan(x, la, lb.abs() + 0.1)
            with pytest.raises(ValueError, match="log_alpha contains NaN"):
                ppma_ops.polyline_scan(x, la.clone().fill_(float("nan")), lb)
            with pytest.raises(ValueError, match="log_alpha must be <= 0"):
                ppma_ops.polyline_scan(x, la.abs() + 0.1, lb)


# ------------------------------------------------------------------------- CUDA only


@cuda_only
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 3), (2, 3, 5, 7, 16), (1, 2, 9, 1, 4), (1, 1, 33, 70, 8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(transpose: bool, shape, dtype) -> None:
    b, heads, h, w, c = shape
    gen = torch.Generator().manual_seed(7)
    la, lb = (log_decays((b, heads, h, w), generator=gen, dtype=dtype, device="cuda")
              for _ in range(2))  # fmt: skip
    x = torch.randn(b, heads, h, w, c, dtype=dtype, device="cuda")

    def native(x, la, lb):
        return ppma_ops.polyline_scan(x, la, lb, transpose=transpose)

    def ref(x, la, lb):
        return reference.polyline_scan(x, la, lb, transpose=transpose)

    out, grads = forward_and_grads(native, (x, la, lb))
    ref_out, ref_grads = forward_and_grads(ref, [t.double() for t in (x, la, lb)])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close_f64(out, ref_out, atol=tol, rtol=tol, what="y")
    for name, g, rg in zip(("x", "log_alpha", "log_beta"), grads, ref_grads, strict=True):
        assert_close_f64(g, rg, atol=10 * tol, rtol=10 * tol, what=f"d{name}")


@cuda_only
def test_cuda_kernel_names_the_argument_on_another_device() -> None:
    shape = (1, 1, 2, 3)
    v = torch.randn(*shape, 4, device="cuda")
    la, lb = (log_decays(shape, device="cuda") for _ in range(2))
    with pytest.raises(RuntimeError, match="log_alpha is on cpu"):
        torch.ops.ppma.polyline_scan(v, la.cpu(), lb, False)
