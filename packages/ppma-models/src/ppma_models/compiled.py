"""torch.compile for PPMA models (docs/design.md §4.3).

The whole forward (and, in training, the backward) is one graph: the ppma_ops calls are custom
ops with fake kernels, the rotary embedding switches to its real-valued form while compiling,
and nothing in the models branches on tensor values. Inductor fuses the elementwise work
between the matrix products and the ops; the ops run as in eager mode, the projections as
``F.linear``. On the CPU that is slower than eager mode, whose projections take oneDNN's
products (packages/ppma-models/README.md, "Training helpers", has the figures).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

#: Inductor settings the models need. ``strict_output_strides``: graph outputs keep their
#: exact strides. Without it Inductor sorts the symbolic strides of outputs that are views
#: (the tokens of a channels-last map, saved for the backward), which fails with dynamic sizes
#: ("cannot determine truth value of Relational") because a grid side might be 1.
INDUCTOR_OPTIONS: Mapping[str, object] = {"strict_output_strides": True}


def compile_model(
    model: nn.Module,
    *,
    dynamic: bool | None = True,
    fullgraph: bool = True,
    backend: str | Callable = "inductor",
    options: Mapping[str, object] | None = None,
) -> Callable[..., object]:
    """``torch.compile(model)`` with the settings PPMA models need.

    dynamic=True (default): inference compiles once for any batch size and input H×W (sizes 0
    and 1 are specialised by torch, as always), training once per first-stage grid.
    ``fullgraph=True`` makes any graph break an error. With the inductor backend, ``options``
    (Inductor config entries) are added to :data:`INDUCTOR_OPTIONS`; other backends take no
    options. Returns the compiled callable; the parameters stay ``model``'s.
    """
    if backend == "inductor":
        merged = {**INDUCTOR_OPTIONS, **(options or {})}
        return torch.compile(model, fullgraph=fullgraph, dynamic=dynamic, options=merged)
    if options:
        raise ValueError(f"options are Inductor settings; backend {backend!r} takes none")
    return torch.compile(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
