"""Fake kernels and autograd of criss-cross polyline attention (csrc/criss_cross_attention.cpp).

``ppma::criss_cross_attention`` is CompositeImplicitAutograd over
``ppma::_criss_cross_attention_fwd``, which also returns what the backward needs: the row
softmaxes (O(N·W) per head) and the two half-way products R(V), Cc(V). The backward recomputes
the column softmaxes from q and k. When no input needs a gradient the public op runs
``ppma::_criss_cross_attention_inference`` instead, which keeps nothing.
"""

from __future__ import annotations

import torch

from .. import reference
from ..dtypes import accumulation_dtype
from ..validation import attention_args_error, grad_error, like_error
from ._attention_autograd import register_attention_autograd
from ._fake import attention_dtypes, check, contiguous_like

_FWD, _BWD = "_criss_cross_attention_fwd", "_criss_cross_attention_bwd"
_INFERENCE = "_criss_cross_attention_inference"


def _check_args(op: str, q, k, v, log_alpha, log_beta) -> None:
    dtypes = attention_dtypes(q, half_on_cpu=True)
    error = attention_args_error(q, k, v, log_alpha, log_beta, dtypes=dtypes, nonempty_head=True)
    check(op, error)


def _saved_shapes(q: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[int, ...]]:
    b, heads, h, w, _ = q.shape
    c = v.shape[-1]
    return {"row_probs": (b, heads, h, w, w), "rows_v": (b, heads, h, w, c),
            "cols_v": (b, heads, h, w, c)}  # fmt: skip


@torch.library.register_fake(f"ppma::{_FWD}")
def _fwd_fake(q, k, v, log_alpha, log_beta, scale):
    _check_args(_FWD, q, k, v, log_alpha, log_beta)
    acc = accumulation_dtype(q.dtype)
    saved = (q.new_empty(shape, dtype=acc) for shape in _saved_shapes(q, v).values())
    return (contiguous_like(v), *saved)


@torch.library.register_fake(f"ppma::{_INFERENCE}")
def _inference_fake(q, k, v, log_alpha, log_beta, scale):
    # The training forward's output, without the saved tensors.
    _check_args(_INFERENCE, q, k, v, log_alpha, log_beta)
    return contiguous_like(v)


@torch.library.register_fake(f"ppma::{_BWD}")
def _bwd_fake(grad_out, q, k, v, log_alpha, log_beta, row_probs, rows_v, cols_v, scale):
    _check_args(_BWD, q, k, v, log_alpha, log_beta)
    check(_BWD, grad_error("grad_out", grad_out, "v", v))
    acc = accumulation_dtype(q.dtype)
    saved = {"row_probs": row_probs, "rows_v": rows_v, "cols_v": cols_v}
    for name, shape in _saved_shapes(q, v).items():
        check(_BWD, like_error(name, saved[name], shape, acc, q.device))
    return tuple(contiguous_like(t) for t in (q, k, v, log_alpha, log_beta))


register_attention_autograd("criss_cross_attention", reference.criss_cross_attention)
