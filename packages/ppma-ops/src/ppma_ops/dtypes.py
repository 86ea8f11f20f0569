"""The dtypes the ops take and the one they compute in.

Inputs are converted once to the accumulation dtype, float32 (float64 stays float64), as the
C++ ``accumulation_type`` (csrc/op_args.h) does; the tensors the native forward ops save for the
backward are in it.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
