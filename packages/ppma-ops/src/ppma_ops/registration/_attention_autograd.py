"""Autograd of an attention op split into a forward op and a backward op.

``ppma::_<name>_fwd(q, k, v, log_alpha, log_beta, scale)`` returns ``(out, *stats)``: the output
and what the backward needs (softmax statistics, half-way products), which are saved and marked
non-differentiable. ``ppma::_<name>_bwd(grad_out, q, k, v, log_alpha, log_beta, *stats, scale)``
returns the five input gradients. Under ``create_graph=True`` the gradients come from the
reference instead (:mod:`._graph_backward`), so higher derivatives are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._graph_backward import builds_graph, reference_gradients


def register_attention_autograd(name: str, reference_op: Callable[..., torch.Tensor]) -> None:
    """Register autograd on ``ppma::_<name>_fwd`` through ``ppma::_<name>_bwd``.

    reference_op(q, k, v, log_alpha, log_beta, *, scale) computes the same output.
    """
    backward_op = getattr(torch.ops.ppma, f"_{name}_bwd")

    def setup_context(ctx, inputs, output) -> None:
        *tensors, scale = inputs
        _out, *stats = output
        ctx.save_for_backward(*tensors, *stats)
        ctx.scale = scale
        # Set by autograd on the saved outputs otherwise; the statistics carry no gradient.
        ctx.mark_non_differentiable(*stats)
        # Their gradients are never used: autograd would allocate and fill zero tensors for
        # them (more than a tenth of the criss-cross backward).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, *_grad_stats):
        q, k, v, log_alpha, log_beta, *stats = ctx.saved_tensors
        inputs = (q, k, v, log_alpha, log_beta)
        if grad_out is None:
            grad_out = torch.zeros_like(v)
        if builds_graph(grad_out, *inputs):
            # create_graph=True: a backward autograd can differentiate again.
            grads = reference_gradients(
                lambda *a: reference_op(*a, scale=ctx.scale), inputs, grad_out
            )
            return (*grads, None)
        return (*backward_op(grad_out, *inputs, *stats, ctx.scale), None)

    torch.library.register_autograd(f"ppma::_{name}_fwd", backward, setup_context=setup_context)
