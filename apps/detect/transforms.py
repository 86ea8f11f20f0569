"""Samples as torchvision ``tv_tensors`` and the training augmentation (transforms v2).

Images, boxes and masks travel together through torchvision's transforms v2, which move the
boxes and masks with the image: a horizontal flip and a scale jitter that also does the
detector's keep-ratio resize (mmdetection resizes in its data pipeline; the detector is built
with ``train_resize=False`` so the jitter is not undone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["RandomRescale", "TrainAugment", "to_image", "to_target"]


def to_image(image: np.ndarray) -> tv_tensors.Image:
    """uint8 (H, W) grey or (H, W, 3) RGB → float (3, H, W) in [0, 1] (the detector normalises)."""
    x = torch.from_numpy(np.ascontiguousarray(image))
    x = x[None].expand(3, -1, -1) if x.ndim == 2 else x.permute(2, 0, 1)
    return tv_tensors.Image(x.float().div(255))


def to_target(
    instances: Sequence[tuple[int, np.ndarray, tuple[float, float, float, float]]],
    height: int,
    width: int,
) -> dict[str, torch.Tensor]:
    """(label, mask (H, W), xyxy box) per instance → the detector's target dict:
    boxes (n, 4) float xyxy, labels (n,) int64, masks (n, H, W) uint8."""
    boxes = torch.tensor([list(box) for _, _, box in instances], dtype=torch.float32)
    masks = np.stack([m for _, m, _ in instances]) if instances else np.zeros((0, height, width))
    return {
        "boxes": tv_tensors.BoundingBoxes(
            boxes.reshape(-1, 4), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.tensor([label for label, _, _ in instances], dtype=torch.int64),
        "masks": tv_tensors.Mask(torch.from_numpy(masks.astype(np.uint8))),
    }


class RandomRescale(v2.Transform):
    """Keep-ratio resize to fit ``min_size`` (shorter side) and ``max_size`` (longer side),
    times a factor drawn uniformly from ``scale_range`` (scale jitter)."""

    def __init__(self, min_size: int, max_size: int, scale_range: tuple[float, float]) -> None:
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.min_size, self.max_size, self.scale_range = min_size, max_size, (low, high)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        h, w = image.shape[-2:]
        fit = min(self.min_size / min(h, w), self.max_size / max(h, w))
        low, high = self.scale_range
        factor = fit * (low + (high - low) * float(torch.rand(())))
        return {"size": [max(1, round(h * factor)), max(1, round(w * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class TrainAugment:
    """Flip (p = 0.5 unless ``flip`` is off) and :class:`RandomRescale`, then drop boxes that
    became smaller than a pixel. Random draws come from the global torch generator, which
    :class:`~apps.detect.data.DetectionSamples` seeds per sample."""

    def __init__(
        self,
        min_size: int,
        max_size: int,
        scale_range: tuple[float, float] = (1.0, 1.0),
        flip: bool = True,
    ) -> None:
        steps: list[v2.Transform] = [v2.RandomHorizontalFlip(0.5)] if flip else []
        steps += [
            RandomRescale(min_size, max_size, scale_range),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
        ]
        self.pipeline = v2.Compose(steps)

    def __call__(
        self, image: tv_tensors.Image, target: dict[str, torch.Tensor]
    ) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
        return self.pipeline(image, target)
