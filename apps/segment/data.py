"""Datasets and loaders of the segment app: built-in scenes or a user's folder.

A *source* yields raw samples -- uint8 image (H, W) or (H, W, 3) and int64 mask (H, W) -- and
:class:`SegmentationSamples` turns them into normalised tensors, applying the training
augmentation with a generator seeded by (seed, epoch, index).
:class:`apps.engine.batching.EpochShuffleSampler` shards and shuffles for ``torchrun`` and
passes the epoch on to the dataset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from apps.data.fashion_mnist import load_fashion_mnist
from apps.engine.options import OptionError
from apps.engine.seeding import seed_for
from apps.segment.folder import FolderDatasetError, SegmentationFolder, folder_layout, scan_folder
from apps.segment.scenes import SCENE_CLASSES, SceneConfig, SceneGenerator
from apps.segment.settings import DEFAULT_VAL_FRACTION
from apps.segment.transforms import TrainAugment, to_tensors

__all__ = [
    "FolderSource",
    "SceneSource",
    "SegmentationSamples",
    "SourcePair",
    "build_sources",
    "recorded_val_source",
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


@dataclass
class SourcePair:
    """Training and validation sources plus what the model needs to know about them."""

    train: Dataset
    val: Dataset | None
    class_names: tuple[str, ...]
    ignore_index: int
    description: dict
    val_same_size: bool  # all validation images share one size (so they can be batched)
    train_sizes: list[tuple[int, int]] | None = None  # (width, height) of each training image
    notes: list[str] = field(default_factory=list)  # what the settings report should mention


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
    # Validation scenes use the Fashion-MNIST test split's items and their own seed stream.
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


def _scan(path: str | Path, args, classes_file: Path | None, num_classes: int | None):
    return scan_folder(
        path,
        num_classes=num_classes,
        ignore_index=args.ignore_index,
        skip_bad=args.skip_bad,
        classes_file=classes_file,
    )


def _folder_sources(args) -> SourcePair:
    layout = folder_layout(args.data)
    folder = _scan(layout.train, args, layout.classes_file, args.num_classes)
    notes = [f"skipped {layout.train}: {problem}" for problem in folder.skipped]
    val_root = args.val_data or layout.val  # an explicit --val-data wins over DIR/val
    if args.val_data and layout.val is not None:
        notes.append(f"--val-data {args.val_data} is used instead of {layout.val}")
    if val_root is not None:
        if args.val_fraction is not None:
            raise OptionError(
                f"--val-fraction {args.val_fraction} applies only without a validation "
                f"folder, but {val_root} is one"
            )
        val_folder = _scan(val_root, args, layout.classes_file, folder.num_classes)
        notes += [f"skipped {val_root}: {problem}" for problem in val_folder.skipped]
        train, val = FolderSource(folder), FolderSource(val_folder)
        val_desc = {"root": str(Path(val_root).resolve())}
    else:
        fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        train_idx, val_idx = _holdout_split(len(folder), fraction, args.seed)
        train = FolderSource(folder, train_idx)
        val = FolderSource(folder, val_idx) if val_idx else None
        val_desc = {
            "root": str(layout.train.resolve()),
            "fraction": fraction,
            "seed": args.seed,
            "images": len(val_idx),
        }
    description = {
        "kind": "folder",
        "root": str(Path(args.data).resolve()),
        "train": str(layout.train.resolve()),
        "val": val_desc if val is not None else None,
        "classes_file": str(layout.classes_file.resolve()) if layout.classes_file else None,
        "skip_bad": bool(args.skip_bad),
    }
    sizes = [folder.sizes[i] for i in train.indices]
    return SourcePair(
        train, val, folder.class_names, args.ignore_index, description, False, sizes, notes
    )


def recorded_val_source(description: dict, num_classes: int, ignore_index: int) -> FolderSource:
    """The validation images of a folder run, from the description its checkpoint recorded."""
    val = description.get("val")
    if "train" not in description or not val:
        what = (
            "held out no validation images"
            if "train" in description
            else "does not record which images it validated on"
        )
        raise FolderDatasetError(
            f"the run {what} (it trained on {description.get('root')}); "
            "pass --data to name the images to score"
        )
    folder = scan_folder(
        val["root"],
        num_classes=num_classes,
        ignore_index=ignore_index,
        skip_bad=description.get("skip_bad", False),
        classes_file=description.get("classes_file"),
    )
    if "fraction" not in val:
        return FolderSource(folder)
    # The held-out part of the training folder: the same split the run drew.
    _, val_idx = _holdout_split(len(folder), val["fraction"], val["seed"])
    if len(val_idx) != val["images"]:
        raise FolderDatasetError(
            f"{val['root']} changed since training: its held-out split now has {len(val_idx)} "
            f"images, the run had {val['images']}; pass --data to name the images to score"
        )
    return FolderSource(folder, val_idx)


def build_sources(args) -> SourcePair:
    """From the train/eval command line: ``--data scenes`` or ``--data DIR``."""
    if args.data == "scenes":
        return _scene_sources(args)
    return _folder_sources(args)
