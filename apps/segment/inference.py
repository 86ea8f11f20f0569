"""Whole-image and sliding-window inference for segmentation models.

Sliding windows (MMSegmentation's ``slide`` mode): windows of ``window`` pixels start every
``stride`` pixels; the last row/column of windows is shifted back to end exactly at the image
border, so every pixel is covered. Logits of overlapping windows are averaged. An image smaller
than the window is run whole (the models accept any size). Use it when test images are larger
than the training crop, so the model sees objects at the scale it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["sliding_window_logits", "window_starts", "whole_logits"]

Model = Callable[[torch.Tensor], torch.Tensor]


def whole_logits(model: Model, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) → (B, classes, H, W) in one forward pass."""
    return model(x)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length): every ``stride``, last one flush."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} would leave pixels uncovered")
    if length <= window:
        return [0]
    count = (length - window + stride - 1) // stride + 1
    return [min(i * stride, length - window) for i in range(count)]


def sliding_window_logits(
    model: Model,
    x: torch.Tensor,
    num_classes: int,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
) -> torch.Tensor:
    """(B, 3, H, W) → (B, classes, H, W), averaging the logits of overlapping windows."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    win_h, win_w = (window, window) if isinstance(window, int) else window
    str_h, str_w = (stride, stride) if isinstance(stride, int) else stride
    b, _, h, w = x.shape
    total = x.new_zeros(b, num_classes, h, w, dtype=torch.float32)
    count = x.new_zeros(1, 1, h, w, dtype=torch.float32)
    for top in window_starts(h, win_h, str_h):
        for left in window_starts(w, win_w, str_w):
            bottom, right = min(top + win_h, h), min(left + win_w, w)
            logits = model(x[:, :, top:bottom, left:right])
            if logits.shape != (b, num_classes, bottom - top, right - left):
                raise ValueError(
                    f"model returned {tuple(logits.shape)} for a window of "
                    f"{bottom - top}x{right - left}; expected ({b}, {num_classes}, ...) logits "
                    "at the window's resolution"
                )
            total[:, :, top:bottom, left:right] += logits.float()
            count[:, :, top:bottom, left:right] += 1
    return total / count
