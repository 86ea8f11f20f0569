"""Fake kernel and autograd for ``torch.ops.ppma.polyline_scan`` (csrc/polyline_scan.cpp).

The backward op recomputes the O(N·c) intermediate grid instead of saving it, so autograd
keeps only the inputs.
"""

from __future__ import annotations

import torch

from .. import reference
from ._graph_backward import builds_graph, reference_gradients


@torch.library.register_fake("ppma::polyline_scan")
def _polyline_scan_fake(
    x: torch.Tensor, log_alpha: torch.Tensor, log_beta: torch.Tensor, transpose: bool
) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ppma::polyline_scan_backward")
def _polyline_scan_backward_fake(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    transpose: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(log_alpha, memory_format=torch.contiguous_format),
        torch.empty_like(log_beta, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, log_alpha, log_beta, transpose = inputs
    ctx.save_for_backward(x, log_alpha, log_beta)
    ctx.transpose = transpose


def _backward(ctx, grad_y: torch.Tensor):
    x, log_alpha, log_beta = ctx.saved_tensors
    if builds_graph(grad_y, x, log_alpha, log_beta):
        # create_graph=True: a backward autograd can differentiate again (second derivatives).
        grads = reference_gradients(
            lambda *a: reference.polyline_scan(*a, transpose=ctx.transpose),
            (x, log_alpha, log_beta),
            grad_y,
        )
        return (*grads, None)
    grad_x, grad_log_alpha, grad_log_beta = torch.ops.ppma.polyline_scan_backward(
        grad_y, x, log_alpha, log_beta, ctx.transpose
    )
    return grad_x, grad_log_alpha, grad_log_beta, None


torch.library.register_autograd("ppma::polyline_scan", _backward, setup_context=_setup_context)
