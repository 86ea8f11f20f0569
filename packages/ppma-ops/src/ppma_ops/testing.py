"""Helpers for testing code built on ppma_ops: inputs, decay regimes and devices.

Used by the ppma_ops tests and importable by the tests of other packages. Needs pytest and
hypothesis (the ``test`` extra: ``pip install ppma-ops[test]``).

- :data:`DECAY_REGIMES` and :func:`log_decays`: log decays drawn from named ranges that stress
  the masks (ordinary, decays near 0, decays near 1).
- :func:`attention_inputs` and the Hypothesis strategy :func:`attention_problems`: q, k, v and
  log decays of the attention ops.
- :func:`sample_inputs`: argument tuples of every ``torch.ops.ppma`` public op on a device, for
  checks such as ``torch.library.opcheck``.
- :data:`DEVICES` and :func:`cuda_only`: the devices a test runs on (CUDA where available,
  marked ``cuda``).
- Checks shared by the op tests: :func:`assert_compiled_matches_eager`,
  :data:`CUDA_REFERENCE_CHECKS` (an attention op on CUDA against its float64 reference) and
  :func:`assert_cuda_matches_cpu`, with :func:`forward_and_grads` and :func:`assert_close_f64`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import strategies as st

# (low, high) of uniformly drawn log decays.
DECAY_REGIMES: dict[str, tuple[float, float]] = {
    "uniform": (-3.0, -0.01),  # decays 0.05 … 0.99
    "small": (-14.0, -9.0),  # decays ≈ 1e-6 … 1e-4: the masks collapse to the diagonal
    "near_zero": (-16.0, -12.0),  # decays ≈ 1e-7 … 6e-6: the masks are nearly the identity
    "near_one": (-2e-6, -1e-7),  # decays within 2e-6 of 1: the masks vanish, plain softmaxes
}

_HAS_CUDA = torch.cuda.is_available()
_NEEDS_CUDA = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device")

#: ``@pytest.mark.parametrize("device", DEVICES)``: the CPU always; CUDA (marked ``cuda``) where
#: a device is present, skipped elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NEEDS_CUDA])]

_Test = TypeVar("_Test", bound=Callable[..., Any])


def cuda_only(test: _Test) -> _Test:
    """Marks a test that runs on a CUDA device only (``cuda`` marker; skipped without one)."""
    return pytest.mark.cuda(_NEEDS_CUDA(test))


def log_decays(
    shape: Sequence[int],
    regime: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Log decays of ``shape`` drawn uniformly from ``DECAY_REGIMES[regime]`` (in float64 on
    the CPU, then cast and moved)."""
    lo, hi = DECAY_REGIMES[regime]
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    return (lo + (hi - lo) * u).to(device=device, dtype=dtype)


def attention_inputs(
    shape: Sequence[int],
    d: int,
    c: int,
    *,
    regimes: tuple[str, str] = ("uniform", "uniform"),
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """[q, k, v, log_alpha, log_beta] for a (B, heads, H, W) ``shape``: q, k (…, d) and v (…, c)
    standard normal, the log decays from ``regimes`` (of log_alpha, log_beta). Drawn in float64
    on the CPU from ``seed``, then cast and moved."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    k = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    v = torch.randn(*shape, c, generator=gen, dtype=torch.float64)
    la = log_decays(shape, regimes[0], generator=gen)
    lb = log_decays(shape, regimes[1], generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, la, lb)]


@st.composite
def attention_problems(
    draw: st.DrawFn, max_side: int = 9, device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], float]:
    """((q, k, v, log_alpha, log_beta), scale) in float64: B ≤ 2, heads ≤ 3, H, W ≤ max_side,
    d ∈ {8, 16, 32, 64}, v as wide as q or narrower (5), any two decay regimes, and scale
    d^-½ or 1."""
    shape = (
        draw(st.integers(1, 2)),  # B
        draw(st.integers(1, 3)),  # heads
        draw(st.integers(1, max_side)),  # H
        draw(st.integers(1, max_side)),  # W
    )
    d = draw(st.sampled_from([8, 16, 32, 64]))
    c = draw(st.sampled_from([d, 5]))  # v may be narrower than q, k
    regimes = (
        draw(st.sampled_from(sorted(DECAY_REGIMES))),
        draw(st.sampled_from(sorted(DECAY_REGIMES))),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([d**-0.5, 1.0]))
    return attention_inputs(shape, d, c, regimes=regimes, seed=seed, device=device), scale


# (B, heads, H, W, d, c) crossing every tiling edge of the CUDA kernels: a single token, H = 1
# and W = 1 lines, grids that are not multiples of the 32/64/128-token tiles, rows longer than
# a 64-token backward block (W = 80: two segments per row; W = 130: three), and head dimensions
# at and between the 32/64/128 register bounds, with c ≠ d.
CUDA_EDGE_SHAPES = [
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


def forward_and_grads(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, seed: int = 1
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """fn(*inputs) and the gradients of ⟨fn(*inputs), g⟩ for a fixed standard-normal g."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, g)


def assert_close_f64(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str
) -> None:
    """assert_close of both tensors in float64 on the CPU, the message prefixed with ``what``."""
    torch.testing.assert_close(
        actual.double().cpu(),
        expected.double().cpu(),
        atol=atol,
        rtol=rtol,
        msg=lambda m: f"{what}: {m}",
    )


# (B, heads, H, W, d, c) of the attention samples: non-square, a single row, a single column.
_ATTENTION_SHAPES = [(2, 2, 3, 5, 8, 6), (1, 1, 1, 7, 4, 4), (1, 2, 4, 1, 16, 5)]


def sample_inputs(
    device: torch.device | str,
    *,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
) -> dict[str, list[tuple[Any, ...]]]:
    """Argument tuples of each public ``torch.ops.ppma`` op, keyed by op name.

    Attention ops: (q, k, v, log_alpha, log_beta, scale); polyline_scan: (x, log_alpha,
    log_beta, transpose); depthwise_conv2d: (x, weight, bias or None), on the CPU only (its
    kernel's device). Tensors are of ``dtype`` on ``device``.
    """

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    def attention() -> list[tuple[Any, ...]]:
        samples = []
        for i, (b, heads, h, w, d, c) in enumerate(_ATTENTION_SHAPES):
            tensors = attention_inputs((b, heads, h, w), d, c, seed=i)
            samples.append((*(leaf(t) for t in tensors), 1 / math.sqrt(d)))
        return samples

    gen = torch.Generator().manual_seed(len(_ATTENTION_SHAPES))
    shape = (2, 2, 3, 4)
    x = leaf(torch.randn(*shape, 5, generator=gen))
    la, lb = (leaf(log_decays(shape, generator=gen)) for _ in range(2))
    samples = {
        "polyline_attention": attention(),
        "criss_cross_attention": attention(),
        "polyline_scan": [(x, la, lb, False), (x, la, lb, True)],
    }
    if torch.device(device).type == "cpu":
        image = leaf(torch.randn(2, 5, 4, 6, generator=gen))
        weight = leaf(torch.randn(6, 1, 3, 3, generator=gen))
        bias = leaf(torch.randn(6, generator=gen))
        samples["depthwise_conv2d"] = [(image, weight, bias), (image, weight, None)]
    return samples


def assert_compiled_matches_eager(fn: Callable[..., torch.Tensor], args: Sequence[torch.Tensor]):
    """``torch.compile(fn, fullgraph=True)`` gives fn's output and the gradients of its sum of
    squares with respect to every argument."""
    eager = [a.detach().clone().requires_grad_() for a in args]
    compiled = [a.detach().clone().requires_grad_() for a in args]
    torch._dynamo.reset()
    y_eager, y_compiled = fn(*eager), torch.compile(fn, fullgraph=True)(*compiled)
    torch.testing.assert_close(y_compiled, y_eager)
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b.grad, a.grad)


_ARG_NAMES = ("q", "k", "v", "log_alpha", "log_beta")
AttentionOp = Callable[..., torch.Tensor]


def _assert_matches(
    op: AttentionOp,
    reference_op: AttentionOp,
    inputs: Sequence[torch.Tensor],
    reference_inputs: Sequence[torch.Tensor],
    *,
    tol: tuple[float, float],
    grad_tol: Callable[[torch.Tensor], tuple[float, float]],
) -> None:
    out, grads = forward_and_grads(op, inputs)
    ref_out, ref_grads = forward_and_grads(reference_op, reference_inputs)
    assert out.device == inputs[0].device and out.dtype == inputs[0].dtype
    assert_close_f64(out, ref_out, atol=tol[0], rtol=tol[1], what="out")
    for name, g, rg in zip(_ARG_NAMES, grads, ref_grads, strict=True):
        assert g.device == out.device and g.dtype == out.dtype, name
        atol, rtol = grad_tol(rg)
        assert_close_f64(g, rg, atol=atol, rtol=rtol, what=f"d{name}")


def _check_tiling_edge(op: AttentionOp, reference_op: AttentionOp, shape) -> None:
    b, heads, h, w, d, c = shape
    inputs = attention_inputs((b, heads, h, w), d, c, seed=hash(shape) % 1000,
                              dtype=torch.float32, device="cuda")  # fmt: skip
    reference_inputs = [t.double() for t in inputs]
    _assert_matches(op, reference_op, inputs, reference_inputs, tol=(2e-5, 1e-4),
                    grad_tol=lambda _: (2e-4, 1e-3))  # fmt: skip


def _check_extreme_decays(op: AttentionOp, reference_op: AttentionOp, regime: str) -> None:
    inputs = attention_inputs((2, 2, 6, 9), 16, 16, regimes=(regime, regime), seed=3,
                              device="cuda")  # fmt: skip
    _assert_matches(op, reference_op, inputs, inputs, tol=(1e-10, 1e-9),
                    grad_tol=lambda _: (1e-9, 1e-8))  # fmt: skip


def _check_low_precision(
    op: AttentionOp, reference_op: AttentionOp, dtype: torch.dtype, atol: float
) -> None:
    inputs = attention_inputs((2, 2, 7, 10), 32, 32, seed=4, dtype=dtype, device="cuda")

    def grad_tol(expected: torch.Tensor) -> tuple[float, float]:
        # Inputs are rounded to dtype, accumulation is fp32: errors scale with |gradient|.
        return 4 * atol * (expected.abs().max().item() + 1.0), 4 * atol

    reference_inputs = [t.double() for t in inputs]
    _assert_matches(op, reference_op, inputs, reference_inputs, tol=(atol, atol), grad_tol=grad_tol)


#: ``@pytest.mark.parametrize(("check", "args"), CUDA_REFERENCE_CHECKS)``, then
#: ``check(op, reference_op, *args)``: an attention op on CUDA, output and gradients, against
#: its reference in float64 — float32 across :data:`CUDA_EDGE_SHAPES`, float64 in every decay
#: regime, float16 and bfloat16 inputs.
CUDA_REFERENCE_CHECKS = (
    [
        pytest.param(_check_tiling_edge, (shape,), id="edges-" + "x".join(map(str, shape)))
        for shape in CUDA_EDGE_SHAPES
    ]
    + [
        pytest.param(_check_extreme_decays, (regime,), id=f"float64-{regime}")
        for regime in sorted(DECAY_REGIMES)
    ]
    + [
        pytest.param(_check_low_precision, (torch.float16, 1e-2), id="fp16"),
        pytest.param(_check_low_precision, (torch.bfloat16, 4e-2), id="bf16"),
    ]
)


def assert_cuda_matches_cpu(fwd_op: Callable[..., tuple[torch.Tensor, ...]]) -> None:
    """Every output of an attention forward op (the output and the tensors saved for the
    backward, which the fake kernels describe by the CPU layout) agrees between CUDA and CPU."""
    inputs = attention_inputs((2, 2, 5, 6), 8, 8, seed=8, device="cuda")
    gpu = fwd_op(*inputs, 0.3)
    cpu = fwd_op(*(t.cpu() for t in inputs), 0.3)
    assert len(gpu) == len(cpu)
    for index, (a, b) in enumerate(zip(gpu, cpu, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, index
        assert_close_f64(a, b, atol=1e-12, rtol=1e-10, what=f"output {index}")
