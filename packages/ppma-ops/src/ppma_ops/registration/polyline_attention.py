"""Fake kernels and autograd of the vanilla polyline attention ops (csrc/polyline_attention.cpp).

``ppma::polyline_attention`` is CompositeImplicitAutograd over ``ppma::polyline_attention_fwd``,
which returns (out, parts, lse): the output, the two normalised softmax outputs O₁, O₂ and their
log-sum-exps, the latter two saved for ``ppma::polyline_attention_backward``.
"""

from __future__ import annotations

import torch

from .. import reference
from ..validation import check_spatial_args
from ._graph_backward import builds_graph, reference_gradients


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("ppma::polyline_attention_fwd")
def _fwd_fake(q, k, v, log_alpha, log_beta, scale):
    # The same shape/dtype/device errors as the CPU kernel (values are not known here).
    check_spatial_args(q, k, v, log_alpha, log_beta, check_values=False)
    b, heads, h, w, _ = q.shape
    c = v.shape[-1]
    acc = _accumulation_dtype(q.dtype)
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    parts = q.new_empty((b, heads, 2, h, w, c), dtype=acc)
    lse = q.new_empty((b, heads, 2, h, w), dtype=acc)
    return out, parts, lse


@torch.library.register_fake("ppma::polyline_attention_backward")
def _backward_fake(grad_out, q, k, v, log_alpha, log_beta, parts, lse, scale):
    check_spatial_args(q, k, v, log_alpha, log_beta, check_values=False)

    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(q), like(k), like(v), like(log_alpha), like(log_beta)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_alpha, log_beta, scale = inputs
    _, parts, lse = output
    ctx.save_for_backward(q, k, v, log_alpha, log_beta, parts, lse)
    ctx.scale = scale
    # parts and lse are statistics for the backward, not differentiable results.
    ctx.mark_non_differentiable(parts, lse)
    # Their gradients are never used: don't let autograd allocate zero tensors for them.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_parts, grad_lse):
    q, k, v, log_alpha, log_beta, parts, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(v)
    if builds_graph(grad_out, q, k, v, log_alpha, log_beta):
        # create_graph=True: a backward autograd can differentiate again (second derivatives).
        grads = reference_gradients(
            lambda *a: reference.polyline_attention(*a, scale=ctx.scale),
            (q, k, v, log_alpha, log_beta),
            grad_out,
        )
        return (*grads, None)
    dq, dk, dv, dla, dlb = torch.ops.ppma.polyline_attention_backward(
        grad_out, q, k, v, log_alpha, log_beta, parts, lse, ctx.scale
    )
    return dq, dk, dv, dla, dlb, None


torch.library.register_autograd(
    "ppma::polyline_attention_fwd", _backward, setup_context=_setup_context
)
