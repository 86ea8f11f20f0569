"""Instance data of the detect app: sources, tensor samples, batches.

A *source* (:class:`SceneSource`, :class:`CocoSource`) gives, for image ``i``:

- ``load(i)`` → (uint8 image (H, W) or (H, W, 3), list of :class:`~apps.detect.scenes.Instance`);
- ``ground_truth(i)`` → (width, height, COCO annotation dicts with ``category_id`` = label),
  what the evaluation scores against;
- ``name(i)`` and ``image_id(i)`` (the id results are written under).

:class:`DetectionSamples` turns a source into (index, image, target) samples for training,
augmented with a generator seeded by (seed, epoch, index); :func:`collate` batches them as
(indices (B,), list of images, list of targets), the form torchvision's detectors take.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from apps.data.fashion_mnist import load_fashion_mnist
from apps.data.images import decode_image
from apps.detect.coco import CocoData, CocoDatasetError, annotation_files, encode_mask, read_coco
from apps.detect.scenes import INSTANCE_CLASSES, Instance, InstanceSceneGenerator
from apps.detect.settings import DEFAULT_VAL_FRACTION
from apps.detect.transforms import TrainAugment, to_image, to_target
from apps.engine.options import OptionError
from apps.engine.seeding import seed_for
from apps.segment.scenes import SceneConfig

__all__ = [
    "CocoSource",
    "DetectionSamples",
    "SceneSource",
    "SourcePair",
    "build_sources",
    "collate",
    "coco_folder",
    "holdout_split",
    "images_dir",
    "scene_source",
]


class SceneSource(Dataset):
    """``count`` scenes of an :class:`InstanceSceneGenerator` (index i → scene i)."""

    def __init__(self, generator: InstanceSceneGenerator, count: int) -> None:
        if count < 1:
            raise ValueError(f"scene count must be >= 1, got {count}")
        self.generator, self.count = generator, count

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> tuple[np.ndarray, list[Instance]]:
        scene = self.generator.scene(index)
        return scene.image, list(scene.instances)

    def ground_truth(self, index: int) -> tuple[int, int, list[dict[str, Any]]]:
        scene = self.generator.scene(index)
        h, w = scene.image.shape
        anns = [
            {
                "category_id": inst.label,
                "bbox": [
                    inst.box[0],
                    inst.box[1],
                    inst.box[2] - inst.box[0],
                    inst.box[3] - inst.box[1],
                ],
                "area": inst.area,
                "segmentation": encode_mask(inst.mask),
                "iscrowd": int(inst.crowd),
            }
            for inst in scene.instances
        ]
        return w, h, anns

    def name(self, index: int) -> str:
        return f"scene_{index:06d}"

    def image_id(self, index: int) -> int:
        return index

    @property
    def sizes(self) -> list[tuple[int, int]]:
        side = self.generator.config.canvas
        return [(side, side)] * self.count


class CocoSource(Dataset):
    """Images of a validated :class:`CocoData`, optionally a subset of them."""

    def __init__(self, data: CocoData, indices: list[int] | None = None) -> None:
        self.data = data
        self.indices = list(range(len(data))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[np.ndarray, list[Instance]]:
        k = self.indices[index]
        image = self.data.images[k]
        anns = self.data.annotations.get(image.id, [])
        instances = []
        for ann, (label, mask, crowd) in zip(anns, self.data.instances(k), strict=True):
            x, y, w, h = ann["bbox"]
            box = (max(x, 0.0), max(y, 0.0), min(x + w, image.width), min(y + h, image.height))
            instances.append(Instance(label, mask.astype(bool), box, crowd))
        return decode_image(image.path, 3), instances

    def ground_truth(self, index: int) -> tuple[int, int, list[dict[str, Any]]]:
        image = self.data.images[self.indices[index]]
        labels = self.data.label_of()
        anns = []
        for ann in self.data.annotations.get(image.id, []):
            x, y, w, h = ann["bbox"]
            anns.append(
                {
                    "category_id": labels[ann["category_id"]],
                    "bbox": [x, y, w, h],
                    "area": ann.get("area", w * h),
                    "segmentation": ann["segmentation"],
                    "iscrowd": ann["iscrowd"],
                }
            )
        return image.width, image.height, anns

    def name(self, index: int) -> str:
        return self.data.images[self.indices[index]].path.name

    def image_id(self, index: int) -> int:
        return self.data.images[self.indices[index]].id

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(self.data.images[k].width, self.data.images[k].height) for k in self.indices]


class DetectionSamples(Dataset):
    """(index, image (3, H, W) float in [0, 1], target) from a source.

    Crowd instances are left out of the targets (ignore regions do not train). With
    ``augment`` the sample of ``index`` in epoch ``epoch`` is augmented under a torch
    generator seeded by (seed, epoch, index): it depends on neither workers, ranks nor
    resumption.
    """

    def __init__(self, source: Dataset, augment: TrainAugment | None = None, seed: int = 0):
        self.source, self.augment, self.seed = source, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, instances = self.source.load(index)
        kept = [(i.label, i.mask, i.box) for i in instances if not i.crowd]
        x = to_image(image)
        target = to_target(kept, *x.shape[-2:])
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_for(self.seed, self.epoch, index))
                x, target = self.augment(x, target)
        return (
            index,
            x.as_subclass(torch.Tensor),
            {k: v.as_subclass(torch.Tensor) for k, v in target.items()},
        )


def collate(batch: list) -> tuple[torch.Tensor, list[torch.Tensor], list[dict]]:
    """(indices (B,), images, targets); the index tensor first, so batch-size bookkeeping
    (:func:`apps.engine.batching.batch_length`) counts images."""
    indices, images, targets = zip(*batch, strict=True)
    return torch.tensor(indices), list(images), list(targets)


@dataclass
class SourcePair:
    """Training and validation sources and what the model needs to know about them."""

    train: Dataset
    val: Dataset | None
    class_names: tuple[str, ...]
    category_ids: list[int]  # label k (1-based) is category category_ids[k - 1]
    description: dict
    notes: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=2)
def _fashion_mnist(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist(split, root)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def scene_source(
    split: str, config: SceneConfig, seed: int, count: int, root: str | None = None
) -> SceneSource:
    """``count`` scenes built from the Fashion-MNIST ``split`` ("train" or "test")."""
    images, labels = _fashion_mnist(split, root)
    return SceneSource(InstanceSceneGenerator(images, labels, config, seed), count)


def _scene_sources(args) -> SourcePair:
    config = SceneConfig(
        canvas=args.canvas,
        min_items=args.min_items,
        max_items=args.max_items,
        min_size=args.min_size,
        max_size=args.max_size,
    )
    # Validation scenes: the test split's items, their own seed stream (as the segment app).
    train = scene_source("train", config, args.scene_seed, args.train_scenes, args.fmnist_dir)
    val = scene_source("test", config, args.scene_seed + 1, args.val_scenes, args.fmnist_dir)
    description = {
        "kind": "scenes",
        "scene_config": config.to_dict(),
        "scene_seed": args.scene_seed,
        "train_scenes": args.train_scenes,
        "val_scenes": args.val_scenes,
    }
    ids = list(range(1, len(INSTANCE_CLASSES) + 1))
    return SourcePair(train, val, INSTANCE_CLASSES, ids, description)


def images_dir(root: Path, annotation_file: Path) -> Path:
    """DIR/images, or COCO's own layout: DIR/train2017 for instances_train2017.json."""
    split = annotation_file.stem.removeprefix("instances_")
    for candidate in (root / "images", root / split):
        if candidate.is_dir():
            return candidate
    raise CocoDatasetError(
        f"{root}: no image folder for {annotation_file.name} (looked for {root / 'images'} "
        f"and {root / split})"
    )


def coco_folder(root: str | Path) -> tuple[Path, Path | None]:
    """(training annotations, validation annotations or None) of a dataset folder."""
    root = Path(root)
    if not root.is_dir():
        raise CocoDatasetError(f"{root} is not a directory")
    files = annotation_files(root)
    if len(files) == 1:
        return files[0], None
    train = [f for f in files if "train" in f.stem]
    val = [f for f in files if "val" in f.stem]
    if len(train) == 1 and len(val) <= 1:
        return train[0], (val[0] if val else None)
    found = [str(f.relative_to(root)) for f in files] or "none"
    raise CocoDatasetError(
        f"{root}: expected one instances_*.json, or one with 'train' and one with 'val' in its "
        f"name (in the folder or in annotations/); found: {found}"
    )


def holdout_split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_val = max(1, round(count * fraction)) if fraction > 0 and count > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def _coco_sources(args) -> SourcePair:
    root = Path(args.data)
    train_file, val_file = coco_folder(root)
    train_data = read_coco(train_file, images_dir(root, train_file), skip_bad=args.skip_bad)
    notes = [f"skipped ({train_file.name}) {p}" for p in train_data.skipped]
    description = {"kind": "coco", "root": str(root.resolve()), "train": str(train_file.resolve())}
    if val_file is not None:
        if args.val_fraction is not None:
            raise OptionError(
                f"--val-fraction applies only without a validation split, but {val_file} is one"
            )
        val_data = read_coco(
            val_file,
            images_dir(root, val_file),
            skip_bad=args.skip_bad,
            categories=train_data.categories,
        )
        notes += [f"skipped ({val_file.name}) {p}" for p in val_data.skipped]
        train, val = CocoSource(train_data), CocoSource(val_data)
        description["val"] = {"annotations": str(val_file.resolve())}
    else:
        fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        train_idx, val_idx = holdout_split(len(train_data), fraction, args.seed)
        train = CocoSource(train_data, train_idx)
        val = CocoSource(train_data, val_idx) if val_idx else None
        description["val"] = {"fraction": fraction, "seed": args.seed, "images": len(val_idx)}
    description["skip_bad"] = bool(args.skip_bad)
    return SourcePair(
        train, val, train_data.class_names, train_data.category_ids, description, notes
    )


def build_sources(args) -> SourcePair:
    """From the train command line: ``--data scenes`` or ``--data DIR`` (COCO format)."""
    if args.data == "scenes":
        return _scene_sources(args)
    return _coco_sources(args)
