"""ppma_mask: the polyline path mask of PPMA and its theory, in float64 NumPy/SciPy.

Tokens of an H×W grid are numbered row-major, u = i·W + j. ``log_alpha`` and ``log_beta`` are
(H, W) tables of log decays ≤ 0 (horizontal and vertical). See docs/design.md §1 and the
package README.

This package imports no torch; it is the numerical oracle of the torch packages' tests.
"""

from ppma_mask.attention import masked_linear_attention
from ppma_mask.factors import broadcast_factors, column_masks, factors, row_masks
from ppma_mask.mask import (
    causal_mask_1d,
    cumulative_log_decays,
    fold,
    log_mask_1d,
    log_polyline_mask,
    manhattan_mask,
    mask_1d,
    polyline_mask,
    polyline_mask_direct,
    unfold,
)
from ppma_mask.product import apply_mask
from ppma_mask.scan import anticausal_scan, causal_scan, mamba2_recurrence, symmetric_scan

__version__ = "0.1.0"

__all__ = [
    "anticausal_scan",
    "apply_mask",
    "broadcast_factors",
    "causal_mask_1d",
    "causal_scan",
    "column_masks",
    "cumulative_log_decays",
    "factors",
    "fold",
    "log_mask_1d",
    "log_polyline_mask",
    "mamba2_recurrence",
    "manhattan_mask",
    "mask_1d",
    "masked_linear_attention",
    "polyline_mask",
    "polyline_mask_direct",
    "row_masks",
    "symmetric_scan",
    "unfold",
]
