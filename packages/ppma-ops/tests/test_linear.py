"""ppma_ops.linear against F.linear in float64 (values, first and second derivatives) and its
routing: oneDNN's product on AVX-512 CPUs under the native backend, F.linear everywhere else."""

from __future__ import annotations

import ppma_ops
import pytest
import torch
import torch.nn.functional as F
from ppma_ops import onednn_linear as linear_module
from torch.utils._python_dispatch import TorchDispatchMode

ONEDNN_HERE = linear_module._CPU_HAS_AVX512 and linear_module._HAS_ONEDNN_LINEAR


class _OpsSeen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _ops_seen(fn) -> list[str]:
    with _OpsSeen() as mode:
        fn()
    return mode.names


def _problem(shape=(2, 5, 7, 24), out_features=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    w = torch.randn(out_features, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(out_features, generator=g) if bias else None
    return x, w, b


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


# (x shape, out features): small, flat, 5-D, and one wide enough for oneDNN's weight gradient.
SHAPES = [((2, 5, 7, 24), 40), ((300, 64), 40), ((1, 3, 3, 3, 8), 40), ((2, 50, 128), 160)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("shape", "out_features"), SHAPES)
def test_values_and_gradients_match_float64(shape, out_features, bias):
    x, w, b = _problem(shape, out_features, bias=bias)
    grad = torch.randn(*shape[:-1], w.shape[0])
    ours = _leaves(x, w, b)
    oracle = _leaves(*(t.double() if t is not None else None for t in (x, w, b)))
    y = ppma_ops.linear(*ours)
    y64 = F.linear(*oracle)
    y.backward(grad)
    y64.backward(grad.double())
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    for got, want in zip(ours, oracle, strict=True):
        if got is not None:
            torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(("shape", "out_features"), SHAPES[:2])
def test_gelu_activation_matches_float64(shape, out_features, grad):
    x, w, b = _problem(shape, out_features)
    ours = _leaves(x, w, b) if grad else (x, w, b)
    oracle = _leaves(x.double(), w.double(), b.double())
    y = ppma_ops.linear(*ours, activation="gelu")
    y64 = F.gelu(F.linear(*oracle))
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    if grad:
        y.sum().backward()
        y64.sum().backward()
        for got, want in zip(ours, oracle, strict=True):
            torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-5, atol=1e-4)


def test_unknown_activation_is_refused():
    x, w, b = _problem()
    with pytest.raises(ValueError, match="activation must be one of"):
        ppma_ops.linear(x, w, b, activation="relu")


def test_strided_input_and_partial_gradients():
    x, w, b = _problem((4, 6, 3, 16))
    x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # not contiguous; needs no gradient
    w_leaf, w64 = w.clone().requires_grad_(), w.double().requires_grad_()
    y = ppma_ops.linear(x, w_leaf, b)
    y64 = F.linear(x.double(), w64, b.double())
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y64.sum().backward()
    torch.testing.assert_close(w_leaf.grad, w64.grad.float(), rtol=1e-5, atol=1e-4)


def test_second_derivatives_match_f_linear():
    x, w, b = (t.double() for t in _problem((3, 8), out_features=5))
    # float64 never takes oneDNN: force the custom autograd to check its create_graph branch.
    xs, ws, bs = _leaves(x, w, b)
    y = linear_module._OneDNNLinear.apply(xs.float(), ws.float(), bs.float())
    (gx,) = torch.autograd.grad(y.pow(2).sum(), xs, create_graph=True)
    (gxw,) = torch.autograd.grad(gx.sum(), ws)
    xr, wr, br = _leaves(x, w, b)
    (gx_ref,) = torch.autograd.grad(F.linear(xr, wr, br).pow(2).sum(), xr, create_graph=True)
    (gxw_ref,) = torch.autograd.grad(gx_ref.sum(), wr)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gxw.double(), gxw_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ONEDNN_HERE, reason="oneDNN's product is taken on AVX-512 CPUs only")
@pytest.mark.parametrize(("shape", "out_features", "onednn_weight_grad"),
                         [((2, 5, 7, 24), 40, False), ((2, 50, 128), 160, True)])  # fmt: skip
def test_float32_takes_onednn_on_avx512_cpus(shape, out_features, onednn_weight_grad):
    x, w, b = _leaves(*_problem(shape, out_features))
    seen = _ops_seen(lambda: ppma_ops.linear(x, w, b).sum().backward())
    assert seen.count("mkldnn::_linear_pointwise") == 2  # forward and input gradient
    assert "aten::addmm" not in seen
    assert ("aten::mkldnn_linear_backward_weights" in seen) == onednn_weight_grad
    with torch.no_grad():
        fused = _ops_seen(lambda: ppma_ops.linear(x, w, b, activation="gelu"))
    assert "mkldnn::_linear_pointwise" in fused and "aten::gelu" not in fused


@pytest.mark.parametrize(
    "context",
    ["reference backend", "float64", "autocast", "no AVX-512"],
)
def test_other_cases_run_f_linear(context, monkeypatch):
    x, w, b = _problem()
    if context == "float64":
        x, w, b = x.double(), w.double(), b.double()
    if context == "no AVX-512":
        monkeypatch.setattr(linear_module, "_CPU_HAS_AVX512", False)
    backend = "reference" if context == "reference backend" else "native"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=context == "autocast")
    with ppma_ops.use_backend(backend), autocast:
        seen = _ops_seen(lambda: ppma_ops.linear(x, w, b))
    assert "mkldnn::_linear_pointwise" not in seen


def test_mismatched_shapes_raise_f_linears_error():
    x, w, b = _problem()
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        ppma_ops.linear(x, w[:, :-1], b)


def test_compiled_graph_sees_f_linear():
    x, w, b = _problem()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(ppma_ops.linear, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), F.linear(x, w, b))
    (graph,) = graphs
    targets = {str(node.target) for node in graph.graph.nodes}
    assert any("linear" in t for t in targets) and not any("mkldnn" in t for t in targets)
