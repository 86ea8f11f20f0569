"""Native criss-cross polyline attention (torch.ops.ppma.criss_cross_attention) against the
float64 reference op, a hand-written loop oracle, finite differences (gradcheck), opcheck and
torch.compile, on the CPU and on CUDA; on CUDA also against the CPU kernel and across the
kernels' tiling edges. The official criss-cross fixture is checked through the real modules in
packages/ppma-models/tests/test_official_ops.py."""

from __future__ import annotations

import numpy as np
import ppma_ops
import pytest
import torch
from hypothesis import given
from ppma_ops import reference
from ppma_ops.testing import (
    CUDA_REFERENCE_CHECKS,
    DEVICES,
    assert_compiled_matches_eager,
    assert_cuda_matches_cpu,
    attention_inputs,
    attention_problems,
    cuda_only,
    sample_inputs,
)

GRAD_NAMES = ("q", "k", "v", "log_alpha", "log_beta")


@pytest.fixture(scope="module", autouse=True)
def _native_criss_cross() -> None:
    # A missing kernel is a build failure, not a reason to skip.
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"
    assert hasattr(torch.ops.ppma, "_criss_cross_attention_fwd"), "criss-cross op not registered"


def _on(device, tensors):
    return [t.to(device) for t in tensors]


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


def _assert_gradients_match(out, expected, args, expected_args, grad_out):
    """The native output's gradients w.r.t. (q, k, v, log_alpha, log_beta) equal the
    reference output's, for the same upstream gradient."""
    native = torch.autograd.grad(out, args, grad_out.to(out.device))
    wanted = torch.autograd.grad(expected, expected_args, grad_out)
    for name, got, want in zip(GRAD_NAMES, native, wanted, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
@given(problem=attention_problems(max_side=7))
def test_float64_matches_reference(problem, device):
    args, scale = problem
    torch.testing.assert_close(
        _native(_on(device, args), scale).cpu(),
        reference.criss_cross_attention(*args, scale=scale),
        rtol=1e-11,
        atol=1e-11,
    )


@pytest.mark.parametrize("device", DEVICES)
@given(problem=attention_problems(max_side=7))
def test_float32_matches_float64_reference(problem, device):
    args, scale = problem
    expected = reference.criss_cross_attention(*args, scale=scale)
    got = _native([a.to(device, torch.float32) for a in args], scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_hand_written_loop_oracle(device):
    q, k, v, la, lb = attention_inputs((1, 1, 3, 4), 8, 8, seed=0)
    scale = 8**-0.5
    expected = _loop_oracle(*(t[0, 0].numpy() for t in (q, k, v, la, lb)), scale)
    got = _native(_on(device, (q, k, v, la, lb)), scale)[0, 0].cpu().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@given(problem=attention_problems(max_side=6))
def test_gradients_match_reference_autograd(problem, device):
    args, scale = problem
    args = [a.clone().requires_grad_() for a in args]
    on_device = [a.detach().to(device).requires_grad_() for a in args]
    out = _native(on_device, scale)
    expected = reference.criss_cross_attention(*args, scale=scale)
    _assert_gradients_match(out, expected, on_device, args, torch.randn_like(expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", [(9, 19), (20, 8), (3, 17), (1, 33)])
def test_wide_grids_match_reference_values_and_gradients(grid, device):
    # The CPU kernel handles columns in blocks of 8 (kColumnBlock); the Hypothesis shapes
    # above stay within one block, these span several and end in a ragged one.
    args = [t.requires_grad_() for t in attention_inputs((2, 2, *grid), 16, 5, seed=2)]
    on_device = [a.detach().to(device).requires_grad_() for a in args]
    out = _native(on_device, 0.25)
    expected = reference.criss_cross_attention(*args, scale=0.25)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-11, atol=1e-11)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)  # fmt: skip
    _assert_gradients_match(out, expected, on_device, args, grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("regime", "grid"), [("uniform", (3, 4)), ("near_one", (1, 5)), ("near_zero", (4, 1))]
)
def test_gradcheck_all_inputs(regime, grid, device):
    args = attention_inputs((1, 1, *grid), 4, 3, regimes=(regime, regime), seed=1, device=device)
    args = [t.requires_grad_() for t in args]
    eps = 1e-8 if regime == "near_one" else 1e-6  # stay inside log decay ≤ 0
    assert torch.autograd.gradcheck(lambda *a: _native(a, 0.5), args, eps=eps, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_decays_of_exactly_one_match_the_reference_gradient(device):
    # log decay 0 makes cumsum differences vanish; like the reference (torch.abs at 0) those
    # pairs contribute no mask gradient.
    args = [a.detach().clone() for a in _small_args(torch.float64)]
    args[3][..., 1:3] = 0.0
    args[4][:, :, 1:, 2] = 0.0
    args = [a.requires_grad_() for a in args]
    on_device = [a.detach().to(device).requires_grad_() for a in args]
    out = _native(on_device, 0.35)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    native = torch.autograd.grad(out, on_device, grad_out.to(device))
    expected = torch.autograd.grad(
        reference.criss_cross_attention(*args, scale=0.35), args, grad_out
    )
    for got, want in zip(native, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_first_decays_get_exactly_zero_gradient(device):
    args = attention_inputs((2, 2, 4, 5), 8, 8, seed=2, device=device)
    args = [a.requires_grad_() for a in args]
    ga, gb = torch.autograd.grad(_native(args, 0.3).square().sum(), args[3:])
    assert torch.all(ga[..., 0] == 0) and torch.all(gb[..., 0, :] == 0)
    assert ga[..., 1:].abs().max() > 0 and gb[..., 1:, :].abs().max() > 0


def _small_args(dtype, requires_grad=True):
    return [a.requires_grad_(requires_grad)
            for a in attention_inputs((2, 2, 3, 4), 8, 6, seed=3, dtype=dtype)]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, device):
    samples = sample_inputs(device, dtype=dtype, requires_grad=True)
    for *args, scale in samples["criss_cross_attention"]:
        torch.library.opcheck(torch.ops.ppma._criss_cross_attention_fwd, (*args, scale))
        torch.library.opcheck(torch.ops.ppma.criss_cross_attention, (*args, scale))
        detached = [a.detach() for a in args]
        _, *saved = torch.ops.ppma._criss_cross_attention_fwd(*detached, scale)
        grad_out = torch.randn_like(detached[2])
        torch.library.opcheck(
            torch.ops.ppma._criss_cross_attention_bwd, (grad_out, *detached, *saved, scale)
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.usefixtures("no_compile_caches")
def test_compiled_forward_and_backward_match_eager(device):
    def f(q, k, v, la, lb):
        return ppma_ops.criss_cross_attention(q, k, v, la, lb).tanh()

    assert_compiled_matches_eager(f, [a.to(device) for a in _small_args(torch.float32)])


def _float32_problem(shape, seed, device="cpu"):
    """q, k, v (d = 16), log decays, all requiring grad, and an output gradient."""
    args = attention_inputs(shape, 16, 16, seed=seed, dtype=torch.float32, device=device)
    grad_out = torch.randn(*shape, 16, generator=torch.Generator().manual_seed(seed))
    return [a.requires_grad_() for a in args], grad_out.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bitwise_deterministic(device):
    args, grad_out = _float32_problem((2, 3, 9, 11), seed=4, device=device)
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
    trained = torch.ops.ppma._criss_cross_attention_fwd(*(a.detach() for a in args), 0.3)[0]
    with OpLog() as grad_log:
        _native(args, 0.3)
    assert torch.equal(fast, trained)
    assert "ppma._criss_cross_attention_inference.default" in log.names
    assert not any("criss_cross_attention_fwd" in name for name in log.names)
    assert "ppma._criss_cross_attention_fwd.default" in grad_log.names
    torch.library.opcheck(
        torch.ops.ppma._criss_cross_attention_inference, (*(a.detach() for a in args), 0.3)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_runs_in_float32_and_returns_bfloat16(device):
    args = [a.detach().to(device, torch.bfloat16) for a in _small_args(torch.float64)]
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
    # Values are checked once, by the public function (ppma_ops.value_checks), on the native
    # and the reference backend alike; the native op checks shapes, dtypes and devices.
    for backend in ppma_ops.BACKENDS:
        with ppma_ops.use_backend(backend):
            with pytest.raises(ValueError, match="log_alpha must be <= 0"):
                ppma_ops.criss_cross_attention(q, k, v, la.abs() + 0.5, lb)
            with pytest.raises(ValueError, match="log_beta contains NaN"):
                ppma_ops.criss_cross_attention(q, k, v, la, lb.clone().fill_(float("nan")))


# ------------------------------------------------------------------------- CUDA only


@cuda_only
@pytest.mark.parametrize(("check", "args"), CUDA_REFERENCE_CHECKS)
def test_cuda_against_the_float64_reference(check, args) -> None:
    check(ppma_ops.criss_cross_attention, reference.criss_cross_attention, *args)


@cuda_only
def test_cuda_kernel_matches_cpu_kernel_including_saved_tensors() -> None:
    assert_cuda_matches_cpu(torch.ops.ppma._criss_cross_attention_fwd)


@cuda_only
def test_cuda_kernel_names_the_argument_on_another_device() -> None:
    q, k, v, la, lb = attention_inputs((1, 1, 2, 3), 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="log_beta is on cpu"):
        torch.ops.ppma._criss_cross_attention_fwd(q, k, v, la, lb.cpu(), 0.5)
