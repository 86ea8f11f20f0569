"""What every fake kernel shares: the C++ kernels' argument errors, raised with torch._check.

A fake kernel sees shapes, dtypes and devices but no values; it checks them by the rules of
:mod:`ppma_ops.validation` (those of csrc/op_args.h) and names the op as the C++ messages do,
so meta tensors and torch.compile report what an eager call would.
"""

from __future__ import annotations

import torch

from ..dtypes import FLOAT_DTYPES
from ..validation import ArgError

# The vanilla attention kernel takes float16 on CUDA only (csrc/op_args.h, kHalfOnCpu).
_NO_HALF = (torch.float32, torch.float64, torch.bfloat16)


def check(op: str, error: ArgError | None) -> None:
    """Raise ``error`` (a rule's first problem, or None) as the kernel of ``op`` would."""
    torch._check(error is None, lambda: f"{op}: {error}")


def attention_dtypes(q: torch.Tensor, *, half_on_cpu: bool) -> tuple[torch.dtype, ...]:
    """The input dtypes an attention kernel takes for q's device."""
    return FLOAT_DTYPES if half_on_cpu or q.device.type == "cuda" else _NO_HALF


def contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous tensor of t's shape, dtype and device, as the kernels return."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)
