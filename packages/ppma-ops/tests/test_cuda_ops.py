"""CUDA kernels of the ppma_ops ops (csrc/cuda/*.cu) against independent oracles: the float64
materialising reference ops, the CPU kernels (including the tensors saved for the backward),
finite differences (gradcheck in float64 on the GPU), opcheck on CUDA tensors, bitwise
reproducibility of the backward, and torch.compile.

These tests need a CUDA device and a library built with the CUDA kernels
(``pip install --no-build-isolation packages/ppma-ops`` against a CUDA torch with nvcc on PATH;
see the package README). Without a device they are skipped: they carry the ``cuda`` marker.
"""

from __future__ import annotations

import ppma_ops
import pytest
import torch
from ppma_ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FORWARD_OPS = (
    "polyline_attention_fwd",
    "polyline_attention_backward",
    "criss_cross_attention_fwd",
    "criss_cross_attention_backward",
    "criss_cross_attention_inference",
    "polyline_scan",
    "polyline_scan_backward",
)

ATTENTION = {
    "polyline": (ppma_ops.polyline_attention, reference.polyline_attention),
    "criss_cross": (ppma_ops.criss_cross_attention, reference.criss_cross_attention),
}

# (B, heads, H, W, d, c). Chosen to cross every tiling edge of the kernels: a single token,
# H = 1 and W = 1 lines, grids that are not multiples of the 32/64/128-token tiles, rows longer
# than a 64-token backward block (W = 80: two segments per row; W = 130: three), and head
# dimensions at and between the 32/64/128 register bounds, with c ≠ d.
SHAPES = [
    (1, 1, 1, 1, 8, 8),
    (2, 1, 1, 9, 8, 4),
    (1, 2, 9, 1, 16, 16),
    (1, 2, 5, 7, 16, 12),
    (2, 2, 14, 14, 32, 32),
    (1, 1, 3, 80, 8, 8),
    (1, 1, 2, 130, 8, 5),
    (1, 1, 6, 11, 48, 64),
    (1, 1, 4, 5, 128, 96),
]

LOG_DECAY_RANGES = {
    "uniform": (-3.0, -0.01),
    "near_zero": (-14.0, -9.0),  # decays ≈ 1e-6…1e-4: masks collapse to the diagonal
    "near_one": (-2e-6, -1e-7),  # decays ≈ 1: plain softmaxes remain
}


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_registered() -> None:
    # A library without the CUDA kernels is a build failure here, not a reason to skip.
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"
    missing = [
        op
        for op in FORWARD_OPS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ppma::{op}", "CUDA")
    ]
    assert not missing, f"no CUDA kernel registered for {missing}"


def _problem(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    regime: str = "uniform",
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """q, k (B, heads, H, W, d), v (…, c), log_alpha, log_beta (B, heads, H, W) on the GPU."""
    b, heads, h, w, d, c = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, h, w, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, heads, h, w, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, heads, h, w, c, generator=gen, dtype=torch.float64)
    lo, hi = LOG_DECAY_RANGES[regime]
    la = lo + (hi - lo) * torch.rand(b, heads, h, w, generator=gen, dtype=torch.float64)
    lb = lo + (hi - lo) * torch.rand(b, heads, h, w, generator=gen, dtype=torch.float64)
    return tuple(t.to("cuda", dtype) for t in (q, k, v, la, lb))


def _forward_and_grads(fn, inputs, grad_out_seed: int = 1):
    """fn(*inputs) and the gradients of <fn(*inputs), g> for a fixed random g."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(grad_out_seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads


def _assert_close(actual, expected, *, atol: float, rtol: float, what: str) -> None:
    torch.testing.assert_close(
        actual.double().cpu(),
        expected.double().cpu(),
        atol=atol,
        rtol=rtol,
        msg=lambda m: f"{what}: {m}",
    )


GRAD_NAMES = ("q", "k", "v", "log_alpha", "log_beta")


@pytest.mark.parametrize("kind", sorted(ATTENTION))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_fp32_matches_float64_reference(kind: str, shape) -> None:
    native, ref = ATTENTION[kind]
    inputs = _problem(shape, seed=hash(shape) % 1000)
    out, grads = _forward_and_grads(native, inputs)
    ref_out, ref_grads = _forward_and_grads(ref, [t.double() for t in inputs])
    assert out.is_cuda and out.dtype == torch.float32
    _assert_close(out, ref_out, atol=2e-5, rtol=1e-4, what="out")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert g.is_cuda and g.dtype == torch.float32, name
        _assert_close(g, rg, atol=2e-4, rtol=1e-3, what=f"d{name}")


@pytest.mark.parametrize("kind", sorted(ATTENTION))
@pytest.mark.parametrize("regime", sorted(LOG_DECAY_RANGES))
def test_attention_float64_matches_reference_for_extreme_decays(kind: str, regime: str) -> None:
    native, ref = ATTENTION[kind]
    inputs = _problem((2, 2, 6, 9, 16, 16), dtype=torch.float64, regime=regime, seed=3)
    out, grads = _forward_and_grads(native, inputs)
    ref_out, ref_grads = _forward_and_grads(ref, inputs)
    _assert_close(out, ref_out, atol=1e-10, rtol=1e-9, what="out")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        _assert_close(g, rg, atol=1e-9, rtol=1e-8, what=f"d{name}")


@pytest.mark.parametrize("kind", sorted(ATTENTION))
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)], ids=["fp16", "bf16"]
)
def test_attention_low_precision_matches_reference(kind: str, dtype, atol: float) -> None:
    native, ref = ATTENTION[kind]
    inputs = _problem((2, 2, 7, 10, 32, 32), dtype=dtype, seed=4)
    out, grads = _forward_and_grads(native, inputs)
    ref_out, ref_grads = _forward_and_grads(ref, [t.double() for t in inputs])
    assert out.dtype == dtype
    _assert_close(out, ref_out, atol=atol, rtol=atol, what="out")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert g.dtype == dtype, name
        # Inputs are rounded to dtype, accumulation is fp32: errors scale with |gradient|.
        scale = rg.abs().max().item() + 1.0
        _assert_close(g, rg, atol=4 * atol * scale, rtol=4 * atol, what=f"d{name}")


def test_polyline_attention_large_grid_reads_tables_outside_shared_memory() -> None:
    # 128×128 tokens: the float32 cumsum tables (128 KiB) exceed the kernels' shared-memory
    # budget, so this runs the global-memory table path (the other tests run the staged one).
    inputs = _problem((1, 1, 128, 128, 8, 8), seed=6)
    out, grads = _forward_and_grads(ppma_ops.polyline_attention, inputs)
    ref_out, ref_grads = _forward_and_grads(reference.polyline_attention, inputs)  # fp32
    _assert_close(out, ref_out, atol=1e-4, rtol=1e-3, what="out")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        _assert_close(g, rg, atol=2e-3, rtol=1e-2, what=f"d{name}")


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 3), (2, 3, 5, 7, 16), (1, 2, 9, 1, 4), (1, 1, 33, 70, 8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polyline_scan_matches_reference(transpose: bool, shape, dtype) -> None:
    b, heads, h, w, c = shape
    q, _, _, la, lb = _problem((b, heads, h, w, 1, 1), dtype=dtype, seed=7)
    x = torch.randn(b, heads, h, w, c, dtype=dtype, device="cuda")

    def native(x, la, lb):
        return ppma_ops.polyline_scan(x, la, lb, transpose=transpose)

    def ref(x, la, lb):
        return reference.polyline_scan(x, la, lb, transpose=transpose)

    out, grads = _forward_and_grads(native, (x, la, lb))
    ref_out, ref_grads = _forward_and_grads(ref, [t.double() for t in (x, la, lb)])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    _assert_close(out, ref_out, atol=tol, rtol=tol, what="y")
    for name, g, rg in zip(("x", "log_alpha", "log_beta"), grads, ref_grads, strict=True):
        _assert_close(g, rg, atol=10 * tol, rtol=10 * tol, what=f"d{name}")


def _blocked(inputs, seed: int, rate: float = 0.3):
    """Some log decays set to −inf (decays of 0, docs/design.md §2.7)."""
    gen = torch.Generator().manual_seed(seed)
    *qkv, la, lb = inputs

    def cut(t: torch.Tensor) -> torch.Tensor:
        hit = torch.rand(t.shape, generator=gen) < rate
        return t.masked_fill(hit.to(t.device), -float("inf"))

    return (*qkv, cut(la), cut(lb))


@pytest.mark.parametrize("kind", sorted(ATTENTION))
@pytest.mark.parametrize("shape", [(2, 2, 6, 9, 16, 16), (1, 1, 3, 80, 8, 8), (1, 1, 40, 4, 8, 8)])
def test_attention_with_blocked_paths_matches_reference(kind: str, shape) -> None:
    # Heads with −inf log decays take the counted (blocked) mask; heads without, the plain one.
    native, ref = ATTENTION[kind]
    inputs = _blocked(_problem(shape, dtype=torch.float64, seed=11), seed=12)
    out, grads = _forward_and_grads(native, inputs)
    ref_out, ref_grads = _forward_and_grads(ref, inputs)
    assert not out.isnan().any()
    _assert_close(out, ref_out, atol=1e-10, rtol=1e-9, what="out")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        _assert_close(g, rg, atol=1e-9, rtol=1e-8, what=f"d{name}")


def test_polyline_attention_with_every_vertical_step_blocked() -> None:
    # A query then reaches only its own grid row through M: its first key tiles are all
    # blocked, and the running softmax maximum stays −inf across them.
    q, k, v, la, lb = _problem((1, 2, 12, 30, 8, 8), dtype=torch.float64, seed=13)
    lb = torch.full_like(lb, -float("inf"))
    out = ppma_ops.polyline_attention(q, k, v, la, lb)
    _assert_close(out, reference.polyline_attention(q, k, v, la, lb), atol=1e-10, rtol=1e-9,
                  what="out")  # fmt: skip


@pytest.mark.parametrize("transpose", [False, True])
def test_polyline_scan_with_blocked_paths_and_infinite_values(transpose: bool) -> None:
    _, _, x, la, lb = _blocked(_problem((2, 2, 5, 7, 1, 3), dtype=torch.float64, seed=14), 15)
    y = ppma_ops.polyline_scan(x, la, lb, transpose=transpose)
    expected = reference.polyline_scan(x, la, lb, transpose=transpose)
    _assert_close(y, expected, atol=1e-11, rtol=1e-11, what="y")
    _, _, x, la, lb = _problem((1, 1, 4, 5, 1, 2), seed=16)
    x[0, 0, 1, 2, 0] = float("inf")  # every mask entry is positive: +inf reaches every token
    y = ppma_ops.polyline_scan(x, la, lb, transpose=transpose)
    assert torch.all(y[..., 0] == float("inf")) and torch.isfinite(y[..., 1]).all()


@pytest.mark.parametrize("kind", sorted(ATTENTION))
def test_second_derivatives_on_cuda(kind: str) -> None:
    native, _ = ATTENTION[kind]
    inputs = [t.requires_grad_(True) for t in _problem((1, 2, 2, 3, 4, 3), dtype=torch.float64)]
    assert torch.autograd.gradgradcheck(lambda *a: native(*a, scale=0.7), inputs, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(ATTENTION))
def test_cuda_kernel_matches_cpu_kernel_including_saved_tensors(kind: str) -> None:
    # The fake kernels describe the saved tensors by the CPU layout; the CUDA op must agree.
    op = getattr(torch.ops.ppma, f"{kind}_attention_fwd")
    inputs = _problem((2, 2, 5, 6, 8, 8), dtype=torch.float64, seed=8)
    gpu = op(*inputs, 0.3)
    cpu = op(*(t.cpu() for t in inputs), 0.3)
    assert len(gpu) == len(cpu)
    for index, (a, b) in enumerate(zip(gpu, cpu, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, index
        _assert_close(a, b, atol=1e-12, rtol=1e-10, what=f"output {index}")


def test_gradcheck_polyline_attention_float64() -> None:
    inputs = [t.requires_grad_(True) for t in _problem((1, 2, 3, 4, 4, 3), dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda *a: ppma_ops.polyline_attention(*a, scale=0.7), inputs, eps=1e-6, atol=1e-5
    )


def test_gradcheck_criss_cross_attention_float64() -> None:
    inputs = [t.requires_grad_(True) for t in _problem((1, 2, 4, 3, 4, 3), dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda *a: ppma_ops.criss_cross_attention(*a, scale=0.7), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck_polyline_scan_float64(transpose: bool) -> None:
    _, _, x, la, lb = _problem((2, 1, 3, 4, 1, 3), dtype=torch.float64, seed=9)
    inputs = [t.requires_grad_(True) for t in (x, la, lb)]
    assert torch.autograd.gradcheck(
        lambda *a: ppma_ops.polyline_scan(*a, transpose=transpose), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("kind", sorted(ATTENTION))
def test_backward_is_bitwise_reproducible(kind: str) -> None:
    native, _ = ATTENTION[kind]
    inputs = _problem((2, 2, 9, 70, 32, 32), seed=10)
    first = _forward_and_grads(native, inputs)
    second = _forward_and_grads(native, inputs)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(GRAD_NAMES, first[1], second[1], strict=True):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes"


def test_scan_backward_is_bitwise_reproducible() -> None:
    _, _, x, la, lb = _problem((2, 2, 17, 23, 1, 16), seed=11)

    def run():
        return _forward_and_grads(lambda *a: ppma_ops.polyline_scan(*a), (x, la, lb))

    (y1, g1), (y2, g2) = run(), run()
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("kind", sorted(ATTENTION))
def test_opcheck_attention_on_cuda(kind: str) -> None:
    args = [t.requires_grad_(True) for t in _problem((2, 2, 3, 5, 8, 6), seed=12)]
    fwd = getattr(torch.ops.ppma, f"{kind}_attention_fwd")
    torch.library.opcheck(fwd.default, (*args, 0.5))
    torch.library.opcheck(getattr(torch.ops.ppma, f"{kind}_attention").default, (*args, 0.5))
    saved = fwd(*(t.detach() for t in args), 0.5)
    backward = getattr(torch.ops.ppma, f"{kind}_attention_backward")
    grad_out = torch.randn_like(saved[0])
    # Both backward ops take (grad_out, q, k, v, log_alpha, log_beta, *saved, scale).
    backward_args = (grad_out, *(t.detach() for t in args), *saved[1:], 0.5)
    torch.library.opcheck(backward.default, backward_args)


@pytest.mark.parametrize("transpose", [False, True])
def test_opcheck_scan_on_cuda(transpose: bool) -> None:
    _, _, x, la, lb = _problem((2, 2, 3, 5, 1, 4), seed=13)
    args = [t.requires_grad_(True) for t in (x, la, lb)]
    torch.library.opcheck(torch.ops.ppma.polyline_scan.default, (*args, transpose))
    grad = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.ppma.polyline_scan_backward.default,
        (grad, *(t.detach() for t in args), transpose),
    )


def test_torch_compile_fullgraph_on_cuda() -> None:
    inputs = _problem((2, 2, 6, 7, 16, 16), seed=14)

    def layer(q, k, v, la, lb):
        a = ppma_ops.polyline_attention(q, k, v, la, lb)
        b = ppma_ops.criss_cross_attention(q, k, v, la, lb)
        return ppma_ops.polyline_scan(a + b, la, lb)

    compiled = torch.compile(layer, fullgraph=True)
    out, grads = _forward_and_grads(compiled, inputs)
    eager_out, eager_grads = _forward_and_grads(layer, inputs)
    _assert_close(out, eager_out, atol=1e-5, rtol=1e-5, what="out")
    for name, g, e in zip(GRAD_NAMES, grads, eager_grads, strict=True):
        _assert_close(g, e, atol=1e-4, rtol=1e-4, what=f"d{name}")


def test_cuda_kernels_name_the_argument_on_another_device() -> None:
    q, k, v, la, lb = _problem((1, 1, 2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="k is on cpu"):
        torch.ops.ppma.polyline_attention_fwd(q, k.cpu(), v, la, lb, 0.5)
    with pytest.raises(RuntimeError, match="log_beta is on cpu"):
        torch.ops.ppma.criss_cross_attention_fwd(q, k, v, la, lb.cpu(), 0.5)
    with pytest.raises(RuntimeError, match="log_alpha is on cpu"):
        torch.ops.ppma.polyline_scan(v, la.cpu(), lb, False)


def test_head_dimension_above_the_register_bound_is_a_clear_error() -> None:
    q, k, v, la, lb = _problem((1, 1, 2, 2, 136, 8))
    with pytest.raises(RuntimeError, match="head dimensions above 128"):
        torch.ops.ppma.polyline_attention_fwd(q, k, v, la, lb, 0.5)
