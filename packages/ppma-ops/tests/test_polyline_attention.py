"""Native vanilla polyline attention (torch.ops.ppma.polyline_attention) against the float64
reference op, the ppma_mask float64 mask, finite differences (gradcheck), opcheck,
torch.compile and a peak-memory bound (no N×N buffer), on the CPU and on CUDA; on CUDA also
against the CPU kernel and across the kernels' tiling edges. The official attention fixture is
checked through the real modules in packages/ppma-models/tests/test_official_ops.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import ppma_mask
import ppma_ops
import pytest
import torch
from hypothesis import given, settings
from ppma_ops import reference
from ppma_ops.testing import (
    CUDA_REFERENCE_CHECKS,
    DEVICES,
    assert_close_f64,
    assert_cuda_matches_cpu,
    attention_inputs,
    attention_problems,
    cuda_only,
    forward_and_grads,
    sample_inputs,
)

GRAD_NAMES = ("q", "k", "v", "log_alpha", "log_beta")


@pytest.fixture(scope="module", autouse=True)
def _native_polyline_attention() -> None:
    # A missing kernel is a build failure, not a reason to skip.
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"
    assert hasattr(torch.ops.ppma, "_polyline_attention_fwd"), "native vanilla op not registered"


def _mask_oracle(q, k, v, la, lb, scale):
    """Float64 attention with the log-mask from ppma_mask (independent of ppma_ops)."""
    q, k, v, la, lb = (t.cpu() for t in (q, k, v, la, lb))
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
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.device))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None)
@given(problem=attention_problems())
def test_forward_matches_reference_and_ppma_mask(problem, device) -> None:
    (q, k, v, la, lb), scale = problem
    out = _native(*(t.to(device) for t in (q, k, v, la, lb)), scale).cpu()
    torch.testing.assert_close(out, _mask_oracle(q, k, v, la, lb, scale), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        out, reference.polyline_attention(q, k, v, la, lb, scale=scale), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None)
@given(problem=attention_problems())
def test_backward_matches_reference(problem, device) -> None:
    (q, k, v, la, lb), scale = problem
    grad_out = torch.randn(*q.shape[:4], v.shape[-1], dtype=torch.float64)
    inputs = [t.to(device) for t in (q, k, v, la, lb)]
    _, native = _grads(_native, inputs, scale, grad_out)
    _, ref = _grads(reference.polyline_attention, (q, k, v, la, lb), scale, grad_out)
    for name, a, b in zip(GRAD_NAMES, native, ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


# Grids whose rows are split across tiles (W above the 64/128/256-token tile targets) or whose
# tiles hold many short rows: the tiling paths a 9×9 Hypothesis grid never reaches.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", [(2, 150), (1, 300), (70, 3), (9, 70), (300, 1), (3, 130)])
def test_large_and_split_row_tiles(grid, device) -> None:
    q, k, v, la, lb = attention_inputs((1, 2, *grid), 8, 6, seed=sum(grid))
    grad_out = torch.randn(*q.shape[:4], 6, dtype=torch.float64)
    inputs = [t.to(device) for t in (q, k, v, la, lb)]
    out, native = _grads(_native, inputs, 0.4, grad_out)
    ref_out, ref = _grads(reference.polyline_attention, (q, k, v, la, lb), 0.4, grad_out)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(GRAD_NAMES, native, ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_against_float64_reference(dtype, tol, device) -> None:
    q, k, v, la, lb = attention_inputs((2, 2, 6, 11), 32, 32, regimes=("small", "uniform"), seed=3)
    grad_out = torch.randn(*q.shape[:4], 32, dtype=torch.float64)
    ref_out, ref = _grads(reference.polyline_attention, (q, k, v, la, lb), 0.3, grad_out)
    low = [t.to(device, dtype) for t in (q, k, v, la, lb)]
    out, native = _grads(_native, low, 0.3, grad_out.to(dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in native)
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=tol, atol=tol)
    for a, b in zip(native, ref, strict=True):
        torch.testing.assert_close(
            a.double().cpu(), b, rtol=10 * tol, atol=10 * tol * b.abs().max()
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", [(3, 4), (5, 1), (1, 6)])
def test_gradcheck_all_inputs(grid, device) -> None:
    seed = grid[0] * 7 + grid[1]
    inputs = [t.requires_grad_(True) for t in attention_inputs((1, 2, *grid), 8, 5, seed=seed,
                                                                device=device)]  # fmt: skip
    assert torch.autograd.gradcheck(lambda *x: _native(*x, 0.5), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_log_decays_use_abs_subgradient(device) -> None:
    # Decays of exactly 1 make cumsum differences vanish: the gradient convention must be
    # torch.abs's (0 at 0), as in the reference.
    q, k, v, la, lb = attention_inputs((1, 2, 4, 5), 8, 8, seed=11)
    la[..., 1:3] = 0.0
    lb[:, :, 2] = 0.0
    grad_out = torch.randn(1, 2, 4, 5, 8, dtype=torch.float64)
    inputs = [t.to(device) for t in (q, k, v, la, lb)]
    _, native = _grads(_native, inputs, 0.5, grad_out)
    _, ref = _grads(reference.polyline_attention, (q, k, v, la, lb), 0.5, grad_out)
    for a, b in zip(native, ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device) -> None:
    samples = sample_inputs(device, dtype=torch.float64, requires_grad=True)
    for *args, scale in samples["polyline_attention"]:
        torch.library.opcheck(torch.ops.ppma._polyline_attention_fwd.default, (*args, scale))
        torch.library.opcheck(torch.ops.ppma.polyline_attention.default, (*args, scale))
        detached = [t.detach() for t in args]
        out, parts, lse = torch.ops.ppma._polyline_attention_fwd(*detached, scale)
        torch.library.opcheck(
            torch.ops.ppma._polyline_attention_bwd.default,
            (torch.randn_like(out), *detached, parts, lse, scale),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_forward_and_backward(device) -> None:
    q, k, v, la, lb = attention_inputs((1, 2, 4, 6), 8, 8, seed=9, dtype=torch.float32,
                                       device=device)  # fmt: skip

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


def test_invalid_arguments_raise_clear_errors() -> None:
    q, k, v, la, lb = attention_inputs((1, 2, 3, 4), 8, 8)
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
        with pytest.raises((ValueError, RuntimeError), match="k"):
            op(q, k.to("meta"), v, la, lb)
    # Values are checked once, by the public function (ppma_ops.value_checks), for either
    # backend; the native op checks shapes, dtypes and devices.
    for backend in ppma_ops.BACKENDS:
        with ppma_ops.use_backend(backend):
            with pytest.raises(ValueError, match="log_alpha"):
                ppma_ops.polyline_attention(q, k, v, la.abs(), lb)
            with pytest.raises(ValueError, match="log_beta"):
                ppma_ops.polyline_attention(q, k, v, la, lb.clone().fill_(float("nan")))
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        torch.ops.ppma.polyline_attention(*(t.half() for t in (q, k, v, la, lb)), 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device) -> None:
    assert torch.get_num_threads() >= 1
    inputs = attention_inputs((2, 2, 9, 70), 16, 16, seed=2, dtype=torch.float32, device=device)
    grad_out = torch.randn(2, 2, 9, 70, 16)
    _, first = _grads(_native, inputs, 0.25, grad_out)
    _, second = _grads(_native, inputs, 0.25, grad_out)
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


# ------------------------------------------------------------------------- CUDA only


@cuda_only
@pytest.mark.parametrize(("check", "args"), CUDA_REFERENCE_CHECKS)
def test_cuda_against_the_float64_reference(check, args) -> None:
    check(ppma_ops.polyline_attention, reference.polyline_attention, *args)


@cuda_only
def test_cuda_large_grid_reads_tables_outside_shared_memory() -> None:
    # 128×128 tokens: the float32 cumsum tables (128 KiB) exceed the kernels' shared-memory
    # budget, so this runs the global-memory table path (the other tests run the staged one).
    inputs = attention_inputs((1, 1, 128, 128), 8, 8, seed=6, dtype=torch.float32, device="cuda")
    out, grads = forward_and_grads(ppma_ops.polyline_attention, inputs)
    ref_out, ref_grads = forward_and_grads(reference.polyline_attention, inputs)  # fp32
    assert_close_f64(out, ref_out, atol=1e-4, rtol=1e-3, what="out")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert_close_f64(g, rg, atol=2e-3, rtol=1e-2, what=f"d{name}")


@cuda_only
def test_cuda_kernel_matches_cpu_kernel_including_saved_tensors() -> None:
    assert_cuda_matches_cpu(torch.ops.ppma._polyline_attention_fwd)


@cuda_only
def test_cuda_kernel_names_the_argument_on_another_device() -> None:
    q, k, v, la, lb = attention_inputs((1, 1, 2, 3), 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="k is on cpu"):
        torch.ops.ppma._polyline_attention_fwd(q, k.cpu(), v, la, lb, 0.5)


@cuda_only
def test_cuda_head_dimension_above_the_register_bound_is_a_clear_error() -> None:
    q, k, v, la, lb = attention_inputs((1, 1, 2, 2), 136, 8, device="cuda")
    with pytest.raises(RuntimeError, match="head dimensions above 128"):
        torch.ops.ppma._polyline_attention_fwd(q, k, v, la, lb, 0.5)


@cuda_only
def test_cuda_torch_compile_fullgraph_across_ops() -> None:
    inputs = attention_inputs((2, 2, 6, 7), 16, 16, seed=14, dtype=torch.float32, device="cuda")

    def layer(q, k, v, la, lb):
        a = ppma_ops.polyline_attention(q, k, v, la, lb)
        b = ppma_ops.criss_cross_attention(q, k, v, la, lb)
        return ppma_ops.polyline_scan(a + b, la, lb)

    compiled = torch.compile(layer, fullgraph=True)
    out, grads = forward_and_grads(compiled, inputs)
    eager_out, eager_grads = forward_and_grads(layer, inputs)
    assert_close_f64(out, eager_out, atol=1e-5, rtol=1e-5, what="out")
    for name, g, e in zip(GRAD_NAMES, grads, eager_grads, strict=True):
        assert_close_f64(g, e, atol=1e-4, rtol=1e-4, what=f"d{name}")
