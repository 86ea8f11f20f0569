"""Image preprocessing and augmentation on (C, H, W) tensors, sized for the input.

Small inputs (<= 64 px, e.g. 28x28 Fashion-MNIST): random crop from a zero-padded image
(pad = size / 14, i.e. shifts of up to 2 px at 28 px) plus optional horizontal flip -- the
classic CIFAR/MNIST recipe, mild enough for short schedules and keeping the object
visible. Flips alone (``crop=False``) regularise less, which suits schedules of a few
epochs. Large inputs (ImageNet-like photos): random resized crop (area 25-100 %, aspect
3/4-4/3) plus flip for training, and resize-shorter-side to size/0.875 then centre crop for
evaluation.

Randomness comes from torch's global generator, which the trainer (and each DataLoader
worker) seeds, so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Preprocess", "SMALL_INPUT_LIMIT", "to_float_tensor"]

SMALL_INPUT_LIMIT = 64


def to_float_tensor(image: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) in 0..255 -> float32 in [0, 1]."""
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float()


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]


@dataclass(frozen=True)
class Preprocess:
    """uint8/float (C, H, W) image -> normalised float (C, size, size) for the model.

    train: apply augmentation: ``crop`` (random crops, see above) and ``hflip`` (random
    horizontal flips; off for e.g. digits);
    channels: the model's input channels (grey images are repeated to RGB, RGB images are
    reduced to luminance), None to keep the image's own.
    """

    size: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    train: bool = False
    hflip: bool = True
    crop: bool = True
    channels: int | None = None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = to_float_tensor(image)
        if self.channels is not None and image.shape[0] != self.channels:
            if image.shape[0] == 1:
                image = image.expand(self.channels, -1, -1)
            elif self.channels == 1 and image.shape[0] == 3:
                weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
                image = (image * weights).sum(0, keepdim=True)
            else:
                raise ValueError(
                    f"image has {image.shape[0]} channels, model expects {self.channels}"
                )
        small = max(self.size) <= SMALL_INPUT_LIMIT
        if self.train and self.crop:
            image = self._crop_small(image) if small else self._random_resized_crop(image)
        else:
            image = _resize(image, self.size) if small else self._centre_crop(image)
        if self.train and self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        image = image.contiguous()
        mean = torch.tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        return (image - mean) / std

    def _crop_small(self, image: torch.Tensor) -> torch.Tensor:
        image = _resize(image, self.size)
        h, w = self.size
        pad = max(1, round(max(h, w) / 14))
        padded = F.pad(image, (pad, pad, pad, pad))
        top = int(torch.randint(0, 2 * pad + 1, ()))
        left = int(torch.randint(0, 2 * pad + 1, ()))
        return padded[:, top : top + h, left : left + w]

    def _random_resized_crop(
        self, image: torch.Tensor, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)
    ) -> torch.Tensor:
        _, height, width = image.shape
        area = height * width
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(*scale))
            aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return _resize(image[:, top : top + h, left : left + w], self.size)
        return self._centre_crop(image)  # extreme aspect ratios: fall back

    def _centre_crop(self, image: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        _, height, width = image.shape
        scale = max(h, w) / 0.875 / min(height, width)
        resized = _resize(image, (max(h, round(height * scale)), max(w, round(width * scale))))
        _, rh, rw = resized.shape
        top, left = (rh - h) // 2, (rw - w) // 2
        return resized[:, top : top + h, left : left + w]
