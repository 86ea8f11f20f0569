"""Batch sizes and epoch plans that use every training image, sized for the data.

A default batch size must leave several optimizer steps per epoch: on a small data set the
usual 128 gives one step per epoch (and with ``drop_last`` some images are never seen).
The last batch of an epoch is kept even when it is short -- except when it would hold a
single image, which BatchNorm cannot normalise (a 1x1 feature map of one image has one
value per channel), so that one image is left out of the epoch (a different one each time,
as the sampler reshuffles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["EpochPlan", "default_batch_size", "plan_epoch"]


def default_batch_size(n_images: int, cap: int = 128, min_steps: int = 4) -> int:
    """The largest power of two <= ``n_images / min_steps``, within ``[2, cap]``.

    Powers of two keep kernels on their fast paths; ``min_steps`` steps per epoch keep the
    optimizer busy on small data. Never more than ``n_images`` (one image: 1).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    target = n_images / min_steps
    size = 2 ** math.floor(math.log2(target)) if target >= 1 else 1
    return max(1, min(n_images, cap, max(2, size)))


@dataclass(frozen=True)
class EpochPlan:
    """How one process's share of the training images is cut into batches."""

    images: int  # images per process per epoch
    batch_size: int
    drop_last: bool  # True only to avoid a final batch of one image
    steps: int

    @property
    def dropped(self) -> int:
        """Images per process left out of each epoch (0 or 1)."""
        return self.images - self.steps * self.batch_size if self.drop_last else 0


def plan_epoch(n_images: int, batch_size: int, world_size: int = 1) -> EpochPlan:
    """Batches for ``n_images`` shared by ``world_size`` processes.

    A DistributedSampler without ``drop_last`` gives each process ``ceil(n / world_size)``
    images (padding with repeats), so every image is seen; this plans that share.
    """
    if n_images < 1 or batch_size < 1 or world_size < 1:
        raise ValueError(f"need n_images, batch_size, world_size >= 1: {n_images, batch_size}")
    per_process = math.ceil(n_images / world_size)
    full, rest = divmod(per_process, batch_size)
    drop_last = rest == 1 and per_process > 1
    steps = full + (1 if rest and not drop_last else 0)
    return EpochPlan(per_process, batch_size, drop_last, steps)
