"""Datasets and loaders of the segment app: built-in scenes or a user's folder.

A *source* yields raw samples -- uint8 image (H, W) or (H, W, 3) and int64 mask (H, W) -- and
:class:`SegmentationSamples` turns them into normalised tensors, applying the training
augmentation with a generator seeded by (seed, epoch, index). :class:`EpochShuffleSampler`
shards and shuffles for ``torchrun`` and passes the epoch on to the dataset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from apps.data.fashion_mnist import load_fashion_mnist
from apps.engine.seeding import seed_for
from apps.segment.folder import SegmentationFolder, scan_folder
from apps.segment.scenes import SCENE_CLASSES, SceneConfig, SceneGenerator
from apps.segment.transforms import TrainAugment, to_tensors

__all__ = [
    "EpochShuffleSampler",
    "FolderSource",
    "SceneSource",
    "SegmentationSamples",
    "SourcePair",
    "build_sources",
    "scene_config_from_args",
    "scene_source",
]


# Scenes kept in memory per source (image + mask, uint8): 32,000 scenes of 64×64 are 262 MB.
SCENE_CACHE_BYTES = 512 * 2**20


class SceneSource(Dataset):
    """``count`` scenes of a :class:`SceneGenerator` (index i → scene i).

    Generating a scene costs about a twentieth of a small model's training step on it,
    and every epoch revisits the same scenes, so the first ``cache_bytes`` worth of generated
    scenes are kept (per process: each DataLoader worker fills its own copy).
    """

    def __init__(
        self, generator: SceneGenerator, count: int, cache_bytes: int = SCENE_CACHE_BYTES
    ) -> None:
        if count < 1:
            raise ValueError(f"scene count must be >= 1, got {count}")
        self.generator, self.count = generator, count
        self.cache_capacity = cache_bytes // (2 * generator.config.canvas**2)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        scene = self._cache.get(index)
        if scene is None:
            scene = self.generator.scene(index)
            if len(self._cache) < self.cache_capacity:
                for array in scene:
                    array.flags.writeable = False  # shared by every later read
                self._cache[index] = scene
        image, mask = scene
        return image, mask.astype(np.int64)


class FolderSource(Dataset):
    """The pairs of a validated :class:`SegmentationFolder`, optionally a subset of them."""

    def __init__(self, folder: SegmentationFolder, indices: list[int] | None = None) -> None:
        self.folder = folder
        self.indices = list(range(len(folder))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.folder.load(self.indices[index])


class SegmentationSamples(Dataset):
    """Tensors from a source: (x float (3, H, W), mask int64 (H, W)).

    With ``augment`` the sample of ``index`` in epoch ``epoch`` is augmented with a generator
    seeded by (seed, epoch, index), so it does not depend on workers, ranks or resumption.
    """

    def __init__(self, source: Dataset, augment: TrainAugment | None = None, seed: int = 0) -> None:
        self.source, self.augment, self.seed = source, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.source[index]
        x, y = to_tensors(image, mask)
        if self.augment is not None:
            generator = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, index))
            x, y = self.augment(x, y, generator)
        return x, y


class EpochShuffleSampler(DistributedSampler):
    """DistributedSampler (shuffled, equal shards) that also tells the dataset the epoch."""

    def __init__(self, dataset: SegmentationSamples, rank: int, world_size: int, seed: int):
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.samples = dataset

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.samples.epoch = epoch


@dataclass
class SourcePair:
    """Training and validation sources plus what the model needs to know about them."""

    train: Dataset
    val: Dataset | None
    class_names: tuple[str, ...]
    ignore_index: int
    description: dict
    val_same_size: bool  # all validation images share one size (so they can be batched)


def scene_source(
    split: str, config: SceneConfig, seed: int, count: int, root: str | None = None
) -> SceneSource:
    """``count`` scenes built from the Fashion-MNIST ``split`` ("train" or "test")."""
    images, labels = _fashion_mnist(split, root)
    return SceneSource(SceneGenerator(images, labels, config, seed), count)


@functools.lru_cache(maxsize=2)
def _fashion_mnist(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    # Decompressing the 60k training images takes about a second; train + eval in one process
    # (and the tests) read each split once.
    images, labels = load_fashion_mnist(split, root)
    images.flags.writeable = labels.flags.writeable = False  # shared: nobody may modify them
    return images, labels


def scene_config_from_args(args) -> SceneConfig:
    return SceneConfig(
        canvas=args.canvas,
        min_items=args.min_items,
        max_items=args.max_items,
        min_size=args.min_size,
        max_size=args.max_size,
    )


def _scene_sources(args) -> SourcePair:
    config = scene_config_from_args(args)
    # Held-out scenes use the test split's items and their own seed stream.
    train = scene_source("train", config, args.scene_seed, args.train_scenes, args.fmnist_dir)
    val = scene_source("test", config, args.scene_seed + 1, args.val_scenes, args.fmnist_dir)
    description = {
        "kind": "scenes",
        "scene_config": config.to_dict(),
        "scene_seed": args.scene_seed,
        "train_scenes": args.train_scenes,
        "val_scenes": args.val_scenes,
    }
    return SourcePair(train, val, SCENE_CLASSES, 255, description, True)


def _holdout_split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_val = max(1, round(count * fraction)) if fraction > 0 and count > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def _folder_sources(args) -> SourcePair:
    folder = scan_folder(
        args.data,
        num_classes=args.num_classes,
        ignore_index=args.ignore_index,
        skip_bad=args.skip_bad,
    )
    if args.val_data:
        val_folder = scan_folder(
            args.val_data,
            num_classes=folder.num_classes,
            ignore_index=args.ignore_index,
            skip_bad=args.skip_bad,
        )
        train, val = FolderSource(folder), FolderSource(val_folder)
    else:
        train_idx, val_idx = _holdout_split(len(folder), args.val_fraction, args.seed)
        train = FolderSource(folder, train_idx)
        val = FolderSource(folder, val_idx) if val_idx else None
    description = {"kind": "folder", "root": str(Path(args.data).resolve())}
    return SourcePair(train, val, folder.class_names, args.ignore_index, description, False)


def build_sources(args) -> SourcePair:
    """From the train/eval command line: ``--data scenes`` or ``--data DIR``."""
    if args.data == "scenes":
        return _scene_sources(args)
    return _folder_sources(args)
