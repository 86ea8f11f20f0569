"""Value checks of the log decays, and where they run (docs/design.md §2.7).

Log decays must be NaN-free and ≤ 0 (decays in [0, 1]; −inf is a decay of 0), and the finite
log decays of each row of log_alpha and each column of log_beta must sum to a finite number in
the accumulation dtype: the ops' cumulative sums would overflow otherwise. This module is the
one place that checks it, once per public ``ppma_ops`` call, for the native and the reference
backend alike. The ``torch.ops.ppma`` kernels check shapes, dtypes and devices only.

Inspecting values means reading them on the host. On CPU tensors that is free, so they are
always checked; on CUDA tensors it costs a device sync per call, so they are checked only when
asked for: ``PPMA_OPS_CHECK_VALUES=1`` in the environment, :func:`set_value_checks`, or
:func:`use_value_checks` for a block::

    with ppma_ops.use_value_checks():
        loss = model(x)  # CUDA calls inside check their log decays too (one sync each)

Fake and meta tensors (torch.compile tracing) have no values and are never inspected.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch

from .dtypes import accumulation_dtype
from .reference import first_of_line

VALUE_CHECKS_ENV = "PPMA_OPS_CHECK_VALUES"


def _from_env(text: str) -> bool:
    if text.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{VALUE_CHECKS_ENV} must be 0 or 1, got {text!r}")


_on_every_device = _from_env(os.environ.get(VALUE_CHECKS_ENV, ""))


def value_checks_enabled() -> bool:
    """True when log-decay values are checked on every device (CPU tensors always are)."""
    return _on_every_device


def set_value_checks(enabled: bool) -> None:
    """Check log-decay values on every device (True) or on CPU tensors only (False)."""
    global _on_every_device
    _on_every_device = bool(enabled)


@contextlib.contextmanager
def use_value_checks(enabled: bool = True) -> Iterator[None]:
    """:func:`set_value_checks` inside the ``with`` block, then restore the previous choice."""
    global _on_every_device
    previous, _on_every_device = _on_every_device, bool(enabled)
    try:
        yield
    finally:
        _on_every_device = previous


def check_log_decay_values(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> None:
    """Refuse NaN, positive and overflowing log decays, naming the argument (ValueError).

    log_alpha, log_beta: (B, heads, H, W). Runs on concrete CPU tensors, and on other devices
    when :func:`value_checks_enabled`; shapes are the ops' to check.
    """
    for name, t, dim in (("log_alpha", log_alpha, -1), ("log_beta", log_beta, -2)):
        if t.dim() >= 2 and t.numel() and _inspectable(t):
            _check_values(name, t, dim)


def _inspectable(t: torch.Tensor) -> bool:
    # First: under torch.compile, is_fake itself may not be traced (fullgraph would break).
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t):
        return False
    return t.device.type == "cpu" or _on_every_device


def _check_values(name: str, t: torch.Tensor, dim: int) -> None:
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one pass, one read; NaN propagates
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{name} contains NaN")
    if hi > 0:
        raise ValueError(f"{name} must be <= 0 (log of a decay in [0, 1]); max is {hi:.3g}")
    acc = accumulation_dtype(t.dtype)
    limit = torch.finfo(acc).max
    if lo * t.shape[dim] >= -limit:
        return  # no line can sum past the limit (and no entry is −inf)
    # The sums the ops form: cumulative, in order, without the line's first log decay (it
    # never enters the mask), so a line overflows where the last of them does.
    finite = t.to(acc).masked_fill(torch.isneginf(t) | first_of_line(t, dim), 0.0)
    if torch.isinf(finite.cumsum(dim).select(dim, -1)).any():
        line = "row" if dim == -1 else "column"
        raise ValueError(
            f"{name}: the finite log decays of a {line} sum below {-limit:.4g}, the {acc} "
            "limit of the cumulative sums; use -inf for a decay of exactly 0"
        )
