"""Backward formulas that autograd can differentiate again.

The native backward ops have no derivatives of their own: a graph recorded through them
(``create_graph=True``) would give second derivatives of zero. When a backward runs with grad
mode enabled and its result can depend on a tensor that requires a gradient, the registrations
compute it instead from the pure-PyTorch reference, recomputed from the saved inputs, so every
higher derivative is autograd's derivative of the reference. That path materialises the N×N
masks; ordinary (first-order) backward passes never take it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def builds_graph(*tensors: torch.Tensor | None) -> bool:
    """True inside a backward run with create_graph=True whose result can carry a graph."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def reference_gradients(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
) -> list[torch.Tensor | None]:
    """Gradients of ``fn(*inputs)`` against ``grad_out``, recorded for further differentiation.

    Inputs that do not require a gradient get None, as autograd expects from a backward.
    """
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(inputs)
    if not wanted:
        return grads
    with torch.enable_grad():
        out = fn(*inputs)
        found = torch.autograd.grad(
            out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True
        )
    for i, g in zip(wanted, found, strict=True):
        grads[i] = g
    return grads
