"""Fake kernels and autograd of vanilla polyline attention (csrc/polyline_attention.cpp).

``ppma::polyline_attention`` is CompositeImplicitAutograd over ``ppma::_polyline_attention_fwd``,
which returns (out, parts, lse): the output, the two normalised softmax outputs O₁, O₂ and their
log-sum-exps, the latter two saved for ``ppma::_polyline_attention_bwd``.
"""

from __future__ import annotations

import torch

from .. import reference
from ..dtypes import accumulation_dtype
from ..validation import attention_args_error, grad_error, like_error
from ._attention_autograd import register_attention_autograd
from ._fake import attention_dtypes, check, contiguous_like

_FWD, _BWD = "_polyline_attention_fwd", "_polyline_attention_bwd"


def _check_args(op: str, q, k, v, log_alpha, log_beta) -> None:
    dtypes = attention_dtypes(q, half_on_cpu=False)
    check(op, attention_args_error(q, k, v, log_alpha, log_beta, dtypes=dtypes))


@torch.library.register_fake(f"ppma::{_FWD}")
def _fwd_fake(q, k, v, log_alpha, log_beta, scale):
    _check_args(_FWD, q, k, v, log_alpha, log_beta)
    b, heads, h, w, _ = q.shape
    c = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    parts = q.new_empty((b, heads, 2, h, w, c), dtype=acc)
    lse = q.new_empty((b, heads, 2, h, w), dtype=acc)
    return contiguous_like(v), parts, lse


@torch.library.register_fake(f"ppma::{_BWD}")
def _bwd_fake(grad_out, q, k, v, log_alpha, log_beta, parts, lse, scale):
    _check_args(_BWD, q, k, v, log_alpha, log_beta)
    check(_BWD, grad_error("grad_out", grad_out, "v", v))
    b, heads, h, w, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    check(_BWD, like_error("parts", parts, (b, heads, 2, h, w, v.shape[-1]), acc, q.device))
    check(_BWD, like_error("lse", lse, (b, heads, 2, h, w), acc, q.device))
    return tuple(contiguous_like(t) for t in (q, k, v, log_alpha, log_beta))


register_attention_autograd("polyline_attention", reference.polyline_attention)
