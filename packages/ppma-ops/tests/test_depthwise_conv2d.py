"""The native channels-last depthwise convolution (torch.ops.ppma.depthwise_conv2d) against
F.conv2d in float64 (values and autograd gradients), finite differences (gradcheck), opcheck,
torch.compile, thread-count determinism and the public function's routing and errors."""

from __future__ import annotations

import ppma_ops
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from ppma_ops import reference
from ppma_ops.testing import assert_compiled_matches_eager, sample_inputs
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(scope="module", autouse=True)
def _native_depthwise() -> None:
    # A missing kernel is a build failure, not a reason to skip.
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"
    assert hasattr(torch.ops.ppma, "depthwise_conv2d"), "ppma.depthwise_conv2d not registered"


def _oracle(x, weight, bias):
    """F.conv2d on the NCHW view, written out here independently of the package."""
    kh, kw = weight.shape[-2:]
    padding, groups = (kh // 2, kw // 2), x.shape[-1]
    return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=padding, groups=groups).permute(
        0, 2, 3, 1
    )


def _native(x, weight, bias):
    return torch.ops.ppma.depthwise_conv2d(x, weight, bias)


@st.composite
def conv_problems(draw):
    b, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    # A register block is 4 vectors (AVX2: 32 floats / 16 doubles; AVX-512: 64 / 32), then
    # single vectors, then single channels: 35, 40 and 83 take every path on either ISA.
    c = draw(st.sampled_from([1, 3, 8, 16, 35, 40, 83]))
    kh, kw = draw(st.sampled_from([1, 3, 5, 7])), draw(st.sampled_from([1, 3, 5, 7]))
    with_bias = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64)
    weight = torch.randn(c, 1, kh, kw, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64) if with_bias else None
    grad_out = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64)
    return x, weight, bias, grad_out


def _value_and_grads(fn, x, weight, bias, grad_out):
    inputs = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    y = fn(*inputs, None) if bias is None else fn(*inputs)
    return (y.detach(), *torch.autograd.grad(y, inputs, grad_out))


@given(problem=conv_problems(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_matches_conv2d_in_float64_values_and_gradients(problem, dtype):
    x, weight, bias, grad_out = problem
    expected = _value_and_grads(_oracle, x, weight, bias, grad_out)
    cast = [None if t is None else t.to(dtype) for t in (x, weight, bias, grad_out)]
    got = _value_and_grads(_native, *cast)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_native, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: _native(x, w, None), (x, w))


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        samples = sample_inputs("cpu", dtype=dtype, requires_grad=True)["depthwise_conv2d"]
        for x, w, b in samples:  # with and without bias
            torch.library.opcheck(torch.ops.ppma.depthwise_conv2d, (x, w, b))
        torch.library.opcheck(
            torch.ops.ppma._depthwise_conv2d_bwd, (torch.randn_like(x), x.detach(), w.detach())
        )


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_the_thread_count(threads, set_threads):
    # 60 rows of 20×40 floats: several row chunks for the weight gradient and parallel rows
    # for the correlations; each output must have the same bits on any number of threads.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 20, 40, generator=gen, requires_grad=True)
    w = torch.randn(40, 1, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(40, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 30, 20, 40, generator=gen)

    def run():
        y = _native(x, w, b)
        return (y.detach(), *torch.autograd.grad(y, (x, w, b), grad_out))

    set_threads(1)
    expected = run()
    set_threads(threads)
    got = run()
    for a, e in zip(got, expected, strict=True):
        assert torch.equal(a, e)


@pytest.mark.usefixtures("no_compile_caches")
def test_compiled_forward_and_backward_match_eager():
    def f(x, w, b):
        return ppma_ops.depthwise_conv2d(torch.relu(x), w, b)

    args = [torch.randn(2, 6, 5, 8), torch.randn(8, 1, 5, 5), torch.randn(8)]
    assert_compiled_matches_eager(f, args)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops_called(fn, *args) -> tuple[torch.Tensor, list[str]]:
    with _OpLog() as log:
        out = fn(*args)
    return out, log.ops


def test_public_function_runs_the_kernel_where_it_applies_and_conv2d_elsewhere():
    x = torch.randn(2, 5, 6, 8)
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    out, ops = _ops_called(ppma_ops.depthwise_conv2d, x, w, b)
    assert "ppma.depthwise_conv2d" in ops
    torch.testing.assert_close(out, _oracle(x, w, b), rtol=1e-5, atol=1e-5)
    # A permuted (non-contiguous) view of an NCHW map is read correctly.
    nchw = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(
        ppma_ops.depthwise_conv2d(nchw.permute(0, 2, 3, 1), w, b),
        _oracle(nchw.permute(0, 2, 3, 1).contiguous(), w, b),
        rtol=1e-5,
        atol=1e-5,
    )
    # bfloat16 and autocast keep F.conv2d's semantics (its casts, its precision).
    xb, wb = x.bfloat16(), w.bfloat16()
    out, ops = _ops_called(ppma_ops.depthwise_conv2d, xb, wb, None)
    assert "ppma.depthwise_conv2d" not in ops and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.depthwise_conv2d(xb, wb), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ops = _ops_called(ppma_ops.depthwise_conv2d, x, w, b)
        expected = F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=1, groups=8).permute(0, 2, 3, 1)
    assert "ppma.depthwise_conv2d" not in ops
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bad_arguments_name_the_problem():
    x, w = torch.randn(1, 4, 4, 3), torch.randn(3, 1, 3, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, W, C\)"):
        ppma_ops.depthwise_conv2d(x[0], w)
    with pytest.raises(ValueError, match=r"weight must have shape \(C, 1, kh, kw\) with C = 3"):
        ppma_ops.depthwise_conv2d(x, torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="kernel size must be odd"):
        ppma_ops.depthwise_conv2d(x, torch.randn(3, 1, 2, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(C,\)"):
        ppma_ops.depthwise_conv2d(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ppma_ops.depthwise_conv2d(x.long(), w)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        ppma_ops.depthwise_conv2d(x, w.to("meta"))
    # The kernel's own checks, for callers of torch.ops.ppma.* directly.
    with pytest.raises(RuntimeError, match="depthwise_conv2d: the CPU kernel takes float32"):
        torch.ops.ppma.depthwise_conv2d(x.half(), w.half(), None)
    with pytest.raises(RuntimeError, match="depthwise_conv2d: weight has dtype"):
        torch.ops.ppma.depthwise_conv2d(x, w.double(), None)
    with pytest.raises(RuntimeError, match="kernel size must be odd"):
        torch.ops.ppma.depthwise_conv2d(x, torch.randn(3, 1, 3, 4), None)
    with pytest.raises(RuntimeError, match="grad_out must have the shape and dtype of x"):
        torch.ops.ppma._depthwise_conv2d_bwd(x[:, :2], x, w)
