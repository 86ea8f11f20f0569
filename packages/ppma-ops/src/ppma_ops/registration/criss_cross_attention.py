"""Fake kernels and autograd for criss-cross polyline attention (csrc/criss_cross_attention.cpp).

``torch.ops.ppma.criss_cross_attention`` is CompositeImplicitAutograd over
``criss_cross_attention_fwd``, which also returns what the backward needs: the row softmaxes
(O(N·W) per head) and the two half-way products R(V), Cc(V). The backward recomputes the column
softmaxes from q and k. Autograd is registered on the fwd op. When no input needs a gradient the
public op runs ``criss_cross_attention_inference`` instead, which keeps nothing.
"""

from __future__ import annotations

import torch

from .. import reference
from ._graph_backward import builds_graph, reference_gradients


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("ppma::criss_cross_attention_fwd")
def _criss_cross_fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    b, heads, h, w, _ = q.shape
    c = v.shape[-1]
    acc = _accumulation_dtype(q.dtype)
    return (
        v.new_empty((b, heads, h, w, c)),
        q.new_empty((b, heads, h, w, w), dtype=acc),
        q.new_empty((b, heads, h, w, c), dtype=acc),
        q.new_empty((b, heads, h, w, c), dtype=acc),
    )


@torch.library.register_fake("ppma::criss_cross_attention_inference")
def _criss_cross_inference_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # The training forward's output, without the saved tensors.
    return _criss_cross_fwd_fake(q, k, v, log_alpha, log_beta, scale)[0]


@torch.library.register_fake("ppma::criss_cross_attention_backward")
def _criss_cross_backward_fake(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    row_probs: torch.Tensor,
    rows_v: torch.Tensor,
    cols_v: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    grid = q.shape[:4]
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape),
        v.new_empty(v.shape),
        q.new_empty(grid),
        q.new_empty(grid),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_alpha, log_beta, scale = inputs
    _out, row_probs, rows_v, cols_v = output
    ctx.save_for_backward(q, k, v, log_alpha, log_beta, row_probs, rows_v, cols_v)
    ctx.scale = scale
    # Set by autograd on the saved outputs otherwise; the statistics carry no gradient.
    ctx.mark_non_differentiable(row_probs, rows_v, cols_v)
    # Autograd would otherwise pass zero tensors for the three unused outputs' gradients:
    # allocating and filling them cost more than a tenth of the backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_row_probs, _grad_rows_v, _grad_cols_v):
    q, k, v, log_alpha, log_beta, *saved = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(v)
    if builds_graph(grad_out, q, k, v, log_alpha, log_beta):
        # create_graph=True: a backward autograd can differentiate again (second derivatives).
        grads = reference_gradients(
            lambda *a: reference.criss_cross_attention(*a, scale=ctx.scale),
            (q, k, v, log_alpha, log_beta),
            grad_out,
        )
        return (*grads, None)
    dq, dk, dv, dlog_alpha, dlog_beta = torch.ops.ppma.criss_cross_attention_backward(
        grad_out, q, k, v, log_alpha, log_beta, *saved, ctx.scale
    )
    return dq, dk, dv, dlog_alpha, dlog_beta, None


torch.library.register_autograd(
    "ppma::criss_cross_attention_fwd", _backward, setup_context=_setup_context
)
