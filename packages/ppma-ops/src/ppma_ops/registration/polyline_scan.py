"""Fake kernels and autograd of ``ppma::polyline_scan`` (csrc/polyline_scan.cpp).

The backward op ``ppma::_polyline_scan_bwd`` recomputes the O(N·c) intermediate grid instead of
saving it, so autograd keeps only the inputs.
"""

from __future__ import annotations

import torch

from .. import reference
from ..validation import grad_error, scan_args_error
from ._fake import check, contiguous_like
from ._graph_backward import builds_graph, reference_gradients

_BWD = "_polyline_scan_bwd"


@torch.library.register_fake("ppma::polyline_scan")
def _scan_fake(
    x: torch.Tensor, log_alpha: torch.Tensor, log_beta: torch.Tensor, transpose: bool
) -> torch.Tensor:
    check("polyline_scan", scan_args_error(x, log_alpha, log_beta))
    return contiguous_like(x)


@torch.library.register_fake(f"ppma::{_BWD}")
def _scan_bwd_fake(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    transpose: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check(_BWD, scan_args_error(x, log_alpha, log_beta))
    check(_BWD, grad_error("grad_y", grad_y, "x", x))
    return contiguous_like(x), contiguous_like(log_alpha), contiguous_like(log_beta)


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
    grads = torch.ops.ppma._polyline_scan_bwd(grad_y, x, log_alpha, log_beta, ctx.transpose)
    return (*grads, None)


torch.library.register_autograd("ppma::polyline_scan", _backward, setup_context=_setup_context)
