"""y = x·Wᵀ + b (optionally followed by GELU) with its products through oneDNN where that is faster.

PyTorch multiplies float32 matrices on the CPU with MKL, which runs its AVX2 code on AMD
processors that have AVX-512 (Zen 4, Zen 5); oneDNN, built into every PyTorch, runs AVX-512
there. On a 2-core AMD EPYC with AVX-512 the models' projection shapes ran 1.7–2.4× faster
through oneDNN (docs/ops-kernels.md, "Linear layers"). The forward and the input gradient
always take it; the weight gradient only where oneDNN's weight-gradient primitive was measured
faster (sums over at most 16384 rows of matrices at least 128 wide), MKL elsewhere.

The oneDNN path is taken for float32 CPU tensors under the "native" backend on CPUs with
AVX-512, outside autocast, ``torch.compile``/``torch.export`` tracing and ONNX export (which see
plain ``F.linear``). Everywhere else this is ``F.linear``. Both paths compute the same product;
only the summation order, hence the last bits, differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import get_backend

# Whether PyTorch dispatches its CPU kernels with AVX-512 here (read once: it cannot change).
_CPU_HAS_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


ACTIVATIONS = (None, "gelu")

# oneDNN's weight gradient beat MKL's for sums over at most this many rows with both sides at
# least _WEIGHT_GRAD_MIN_FEATURES wide (1.4–2× at PPMA-T's stages 2–4); over longer sums or
# narrower matrices (stage 1) it was slower, so MKL keeps those.
_WEIGHT_GRAD_MAX_ROWS = 16384
_WEIGHT_GRAD_MIN_FEATURES = 128


def _onednn_product(
    a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False
) -> torch.Tensor:
    """a (M, K) · b_tᵀ (K, N) + bias, then the exact GELU if asked, through oneDNN."""
    post_op, algorithm = ("gelu", "none") if gelu else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, post_op, [], algorithm)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., K) as contiguous (M, K) rows: oneDNN takes row-major rows only."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _weight_and_bias_grads(
    grad: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor, want_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gradᵀ·flat (N, K) and grad's column sums (N,) for grad (M, N), flat (M, K)."""
    rows, (n, k) = grad.shape[0], weight.shape
    if rows <= _WEIGHT_GRAD_MAX_ROWS and min(n, k) >= _WEIGHT_GRAD_MIN_FEATURES:
        grad_w, grad_b = torch.ops.aten.mkldnn_linear_backward_weights(
            grad.to_mkldnn(), flat.to_mkldnn(), weight, want_bias
        )
        return grad_w, grad_b if want_bias else None
    return grad.t() @ flat, grad.sum(0) if want_bias else None


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # Anything unusual (other dtypes, mismatched shapes) goes to F.linear, which reports it.
    return (
        _CPU_HAS_AVX512
        and _HAS_ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
        and x.numel() > 0
        and get_backend() == "native"
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
    )


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        flat = _rows(x)
        ctx.save_for_backward(flat, weight)
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        out = _onednn_product(flat, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat, weight = ctx.saved_tensors
        grad_flat = _rows(grad_out)
        want_x, want_w, want_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if want_x:
            if torch.is_grad_enabled():  # create_graph=True: keep the product differentiable
                grad_x = grad_flat @ weight
            else:
                grad_x = _onednn_product(grad_flat, weight.t().contiguous(), None)
            grad_x = grad_x.view(ctx.input_shape)
        want_b = want_b and ctx.has_bias
        if torch.is_grad_enabled():
            grad_w = grad_flat.t() @ flat if want_w else None
            grad_b = grad_flat.sum(0) if want_b else None
        elif want_w:
            grad_w, grad_b = _weight_and_bias_grads(grad_flat, flat, weight, want_b)
        elif want_b:
            grad_b = grad_flat.sum(0)
        return grad_x, grad_w, grad_b


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then ``F.gelu`` (exact) with ``activation="gelu"``.

    x (..., K), weight (N, K), bias (N,) → (..., N). Runs oneDNN for the products where that is
    faster (see the module docstring); there, when no gradient is needed, the GELU is applied
    as the product is written instead of in a second pass. ``F.linear`` (+ ``F.gelu``)
    otherwise.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    gelu = activation == "gelu"
    if not _takes_onednn(x, weight, bias):
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if gelu and not needs_grad:
        return _onednn_product(_rows(x), weight, bias, gelu=True).view(*x.shape[:-1], -1)
    y = _OneDNNLinear.apply(x, weight, bias)
    return F.gelu(y) if gelu else y
