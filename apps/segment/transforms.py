"""Joint image/mask transforms: normalisation and the training augmentation.

Images become float (3, H, W) tensors normalised with the ImageNet statistics (the published
backbones were trained with them); masks become int64 (H, W). The augmentation -- random
rescale, pad, random crop, horizontal flip -- moves image and mask together: the image is
resampled bilinearly, the mask by nearest neighbour (class ids must not be blended), and padding
of the mask uses the ignore index so padded pixels carry no loss.

Randomness comes from an explicit ``torch.Generator`` so a sample's augmentation is a function
of (seed, epoch, index), whatever the number of loader workers or processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from ppma_models import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["TrainAugment", "denormalize", "to_tensors"]


def to_tensors(image: np.ndarray, mask: np.ndarray | None = None):
    """uint8 image (H, W) or (H, W, 3) → normalised float (3, H, W); mask → int64 (H, W)."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}"
        )
    x = torch.from_numpy(np.array(image, copy=True)).float().div_(255.0)
    x = x.unsqueeze(0).expand(3, -1, -1) if x.dim() == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (x - mean) / std
    if mask is None:
        return x
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    return x, torch.from_numpy(np.array(mask, dtype=np.int64, copy=True))


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_tensors` for display: (3, H, W) → uint8 (H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)


@dataclass(frozen=True)
class TrainAugment:
    """Rescale by a factor in ``scale_range``, pad to ``crop``, random crop, random h-flip.

    __call__(x (3, H, W) float, mask (H, W) int64, generator) → (3, crop, crop), (crop, crop).
    """

    crop: int
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    ignore_index: int = 255

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if self.crop < 1:
            raise ValueError(f"crop must be >= 1, got {self.crop}")
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")

    def __call__(
        self, x: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale_range
        factor = lo + (hi - lo) * float(torch.rand((), generator=generator))
        h, w = x.shape[-2:]
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        if size != (h, w):
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        # Pad to the crop size: image with 0 (the mean after normalisation), mask with ignore.
        pad_h, pad_w = max(self.crop - size[0], 0), max(self.crop - size[1], 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        h, w = x.shape[-2:]
        top = int(torch.randint(h - self.crop + 1, (), generator=generator))
        left = int(torch.randint(w - self.crop + 1, (), generator=generator))
        x = x[:, top : top + self.crop, left : left + self.crop]
        mask = mask[top : top + self.crop, left : left + self.crop]
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            x, mask = x.flip(-1), mask.flip(-1)
        return x.contiguous(), mask.contiguous()
