"""Batch sizes and epoch plans that use every training image, sized for the data.

A default batch size must leave several optimizer steps per epoch: on a small data set the
usual 128 gives one step per epoch (and with ``drop_last`` some images are never seen).
The last batch of an epoch is kept even when it is short -- except when it would hold a
single image, which BatchNorm cannot normalise (a 1x1 feature map of one image has one
value per channel), so that one image is left out of the epoch (a different one each time,
as the sampler reshuffles).

A batch can still shrink below its plan when files fail to load and the collate function
drops them; :func:`batch_length`, :func:`planned_batch_size` and :func:`unreadable_in_batch`
let the training loop notice a batch of one and name the files that were lost.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DistributedSampler, SequentialSampler, Subset

from apps.engine.seeding import capture_rng_state, restore_rng_state

__all__ = [
    "EpochPlan",
    "EpochShuffleSampler",
    "batch_length",
    "default_batch_size",
    "plan_epoch",
    "planned_batch_size",
    "unreadable_in_batch",
]


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


def batch_length(batch: Any) -> int | None:
    """Samples in a collated batch: the first dimension of its first tensor (searching
    tuples, lists and dict values in order); None when it holds no batched tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        length = batch_length(item)
        if length is not None:
            return length
    return None


def planned_batch_size(loader: Any) -> int | None:
    """The batch size a loader was built with (None when it does not say)."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size


def _sample_name(dataset: Any, index: int) -> str:
    """A file name for sample ``index`` when the dataset lists ``samples`` (path first)."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    try:
        entry = dataset.samples[index]
    except (AttributeError, IndexError, KeyError, TypeError):
        return f"sample {index}"
    return str(entry[0] if isinstance(entry, (tuple, list)) else entry)


def unreadable_in_batch(loader: Any, position: int) -> list[str] | None:
    """The samples of this epoch's batch number ``position`` that fail to load.

    The loader cannot say which samples its collate function dropped, so the batch's indices
    are replayed from the sampler -- possible only when the order is fixed by the epoch
    (a sampler with ``set_epoch``, or a sequential one) -- and each sample is loaded again.
    Global generators are restored afterwards, so training stays reproducible. Returns None
    when the batch cannot be replayed. Costly; meant for the rare damaged batch.
    """
    sampler = getattr(loader, "sampler", None)
    batches, dataset = getattr(loader, "batch_sampler", None), getattr(loader, "dataset", None)
    if batches is None or dataset is None:
        return None
    if not (hasattr(sampler, "set_epoch") or isinstance(sampler, SequentialSampler)):
        return None
    indices = next(itertools.islice(iter(batches), position, None), None)
    if indices is None:
        return None
    state = capture_rng_state()
    try:
        failed = [index for index in indices if dataset[index] is None]
    except Exception:  # a dataset that raises instead of yielding None: nothing to name
        return None
    finally:
        restore_rng_state(state)
    return [_sample_name(dataset, index) for index in failed]


class EpochShuffleSampler(DistributedSampler):
    """DistributedSampler (shuffled, equal shards) that also tells the dataset the epoch, for
    datasets whose augmentation is seeded by (seed, epoch, index): set on ``dataset.epoch``."""

    def __init__(self, dataset: Any, rank: int, world_size: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.samples = dataset

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.samples.epoch = epoch
