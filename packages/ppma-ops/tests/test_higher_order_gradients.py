"""Second and higher derivatives through every native op.

The native backward ops have no derivative of their own; under ``create_graph=True`` the
registrations compute the backward from the reference instead (autograd of the plain-PyTorch
op, ``F.conv2d`` for depthwise_conv2d), so double backward is autograd's derivative of an
independent formula. Checked by ``gradgradcheck`` (finite differences of the backward, on the
CPU and on CUDA) and against the reference's own second derivatives in float64; first-order
backward passes must keep using the native ops.
"""

from __future__ import annotations

import ppma_ops
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ppma_ops import reference
from ppma_ops.testing import DEVICES


@pytest.fixture(scope="module", autouse=True)
def _native_ops() -> None:
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"


def _attention_args(shape, d, c, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, d, generator=gen, dtype=dtype)
    k = torch.randn(*shape, d, generator=gen, dtype=dtype)
    v = torch.randn(*shape, c, generator=gen, dtype=dtype)
    # Away from log decay 0, where |·| has its kink and finite differences straddle it.
    la = -0.1 - 1.4 * torch.rand(shape, generator=gen, dtype=dtype)
    lb = -0.1 - 1.4 * torch.rand(shape, generator=gen, dtype=dtype)
    return [q, k, v, la, lb]


def _conv_args(seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 5, 3, generator=gen, dtype=dtype)
    weight = torch.randn(3, 1, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(3, generator=gen, dtype=dtype)
    return [x, weight, bias]


# name → (public op, reference, argument builder)
OPS = {
    "polyline_attention": (
        ppma_ops.polyline_attention,
        reference.polyline_attention,
        lambda seed: _attention_args((1, 2, 2, 3), 4, 3, seed),
    ),
    "criss_cross_attention": (
        ppma_ops.criss_cross_attention,
        reference.criss_cross_attention,
        lambda seed: _attention_args((1, 2, 2, 3), 4, 3, seed),
    ),
    "polyline_scan": (
        ppma_ops.polyline_scan,
        reference.polyline_scan,
        lambda seed: _attention_args((1, 2, 2, 3), 4, 3, seed)[2:],
    ),
    "polyline_scan_transposed": (
        lambda x, la, lb: ppma_ops.polyline_scan(x, la, lb, transpose=True),
        lambda x, la, lb: reference.polyline_scan(x, la, lb, transpose=True),
        lambda seed: _attention_args((1, 2, 2, 3), 4, 3, seed)[2:],
    ),
    "depthwise_conv2d": (ppma_ops.depthwise_conv2d, reference.depthwise_conv2d, _conv_args),
}


def _hessian_vector_products(fn, args, seed):
    """∂/∂args of ⟨∂⟨fn(args), w⟩/∂args, u⟩ for fixed random w and u (a Hessian-vector product)."""
    gen = torch.Generator().manual_seed(seed)
    args = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*args)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, args, w, create_graph=True)
    u = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in grads]
    inner = sum((g * ui).sum() for g, ui in zip(grads, u, strict=True))
    # A bias enters linearly: its second derivative is unused, i.e. zero.
    return torch.autograd.grad(inner, args, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OPS))
def test_gradgradcheck(name, device):
    op, _, make_args = OPS[name]
    args = [a.to(device).requires_grad_() for a in make_args(0)]
    assert torch.autograd.gradgradcheck(op, args, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(OPS))
def test_second_derivatives_match_the_reference(name):
    op, ref, make_args = OPS[name]
    args = make_args(1)
    got = _hessian_vector_products(op, args, seed=2)
    want = _hessian_vector_products(ref, args, seed=2)
    assert max(w.abs().max().item() for w in want) > 1e-3  # a real second derivative
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@settings(max_examples=15)
@given(
    op_name=st.sampled_from(["polyline_attention", "criss_cross_attention"]),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 4)),
    d=st.sampled_from([2, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_second_derivatives_over_shapes(op_name, grid, d, seed):
    op, ref, _ = OPS[op_name]
    args = _attention_args((1, 2, *grid), d, 3, seed)
    got = _hessian_vector_products(op, args, seed)
    want = _hessian_vector_products(ref, args, seed)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_third_derivative_of_the_scan_is_the_reference_one():
    # The recorded backward is the reference's, so every further order follows.
    x, la, lb = (a.requires_grad_() for a in OPS["polyline_scan"][2](3))

    def third(fn):
        g1 = torch.autograd.grad(fn(x, la, lb).sin().sum(), la, create_graph=True)[0]
        g2 = torch.autograd.grad(g1.sin().sum(), lb, create_graph=True)[0]
        return torch.autograd.grad(g2.sum(), (x, la, lb))

    for g, w in zip(third(ppma_ops.polyline_scan), third(reference.polyline_scan), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["polyline_attention", "criss_cross_attention", "polyline_scan"])
def test_first_order_backward_stays_native(name, monkeypatch):
    op, _, make_args = OPS[name]
    args = [a.requires_grad_() for a in make_args(4)]
    expected = torch.autograd.grad(op(*args).square().sum(), args)

    def refuse(*_a, **_k):
        raise AssertionError("the reference ran in a first-order backward")

    monkeypatch.setattr(reference, name, refuse)
    got = torch.autograd.grad(op(*args).square().sum(), args)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["polyline_attention", "criss_cross_attention", "polyline_scan"])
def test_only_inputs_that_require_grad_get_a_graph(name):
    # Only log_alpha requires a gradient: the recorded backward still differentiates correctly.
    op, ref, make_args = OPS[name]
    args = make_args(5)
    la_index = len(args) - 2

    def grad_of_grad(fn):
        a = [t.clone() for t in args]
        a[la_index].requires_grad_()
        (g,) = torch.autograd.grad(fn(*a).square().sum(), a[la_index], create_graph=True)
        return torch.autograd.grad(g.square().sum(), a[la_index])[0]

    torch.testing.assert_close(grad_of_grad(op), grad_of_grad(ref), rtol=1e-9, atol=1e-10)
