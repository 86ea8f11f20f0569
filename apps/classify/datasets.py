"""Data sources for the classifier: Fashion-MNIST, scikit-learn digits, image folders.

``--data`` takes ``fashion-mnist``, ``digits`` or a directory in ImageFolder layout (one
subfolder per class; ``DIR/train``, ``DIR/val`` and ``DIR/test`` are the splits when present,
as in ImageNet, and a directory without them is one pool of images).
Built-in sets live in memory as uint8 arrays; folder images are decoded on demand, and an
unreadable or corrupt file is reported on stderr and skipped (the dataset yields ``None``
and :func:`collate_skipping_failed` drops it), so one bad file never stops a long run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ppma_models import IMAGENET_MEAN, IMAGENET_STD
from torch.utils.data import Dataset, default_collate

from apps.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from apps.data.images import decode_image

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "DatasetSpec",
    "FolderDataset",
    "ImageArrayDataset",
    "collate_skipping_failed",
    "default_eval_split",
    "load_split",
    "scan_image_folder",
    "split_indices",
]

BUILTIN_DATASETS = ("fashion-mnist", "digits")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DIGITS_TEST_FRACTION = 0.2  # digits has no official test split; ours is fixed (seed 0)


class DataError(ValueError):
    """The requested data set cannot be used (missing, empty, inconsistent)."""


@dataclass
class DatasetSpec:
    """What the model needs to know about a data set (stored in checkpoints)."""

    name: str
    class_names: list[str]
    in_chans: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True
    extra: dict = field(default_factory=dict)


class ImageArrayDataset(Dataset):
    """In-memory uint8 images (n, H, W) or (n, H, W, C) with int64 labels."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4:
            images = images.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"images must have shape (n, H, W[, C]), got {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def subset(self, indices: np.ndarray) -> ImageArrayDataset:
        out = ImageArrayDataset.__new__(ImageArrayDataset)
        out.images, out.labels = self.images[indices], self.labels[indices]
        out.transform = self.transform
        return out


def read_image(path: str | os.PathLike, channels: int) -> torch.Tensor:
    """Decode an image file to uint8 (channels, H, W); raises on unreadable files.

    Every PIL mode is mapped to 8-bit by :func:`apps.data.images.decode_image` (16-bit data
    scaled, alpha composited on black), not clipped by ``convert``.
    """
    array = decode_image(path, 1 if channels == 1 else 3)
    return torch.from_numpy(array).permute(2, 0, 1)


class FolderDataset(Dataset):
    """Images listed by :func:`scan_image_folder`, decoded on access.

    A file that fails to decode is reported once on stderr and yields ``None``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        channels: int = 3,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.channels = channels
        self.transform = transform
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        path, label = self.samples[index]
        try:
            image = read_image(path, self.channels)
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            if path not in self._reported:
                self._reported.add(path)
                print(
                    f"warning: skipping unreadable image {path}: {type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(label, dtype=torch.int64)

    def subset(self, indices: np.ndarray) -> FolderDataset:
        return FolderDataset([self.samples[i] for i in indices], self.channels, self.transform)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)


def collate_skipping_failed(batch: list) -> object | None:
    """``default_collate`` over the samples that loaded; ``None`` if none did."""
    good = [sample for sample in batch if sample is not None]
    return default_collate(good) if good else None


def scan_image_folder(
    root: str | os.PathLike, class_names: Sequence[str] | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, class_names)`` for ``root/<class>/**/<image>``; classes sorted by name.

    With ``class_names`` given (e.g. from a checkpoint), labels follow that order and a
    folder naming an unknown class is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: not a directory (or use fashion-mnist / digits)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"--data {root}: no class subfolders (expected {root}/<class>/<image>)")
    names = list(class_names) if class_names is not None else found
    index = {name: i for i, name in enumerate(names)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise DataError(
            f"--data {root}: class folder(s) {unknown[:5]} are not among the model's classes"
        )
    samples, empty = [], []
    for name in found:
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples.extend((str(p), index[name]) for p in files)
        if not files:
            empty.append(name)
    if not samples:
        raise DataError(f"--data {root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        # Still classes (the folder says so, and labels must not shift), but a model never
        # shown one cannot learn it: usually a copy went wrong or a folder is left over.
        print(
            f"warning: --data {root}: {len(empty)} class folder(s) without images "
            f"{empty[:10]}; they remain classes the model can never learn",
            file=sys.stderr,
        )
    return samples, names


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random ``(keep, held_out)`` split with ``round(n * fraction)`` held out."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    held = round(n * fraction)
    return np.sort(order[held:]), np.sort(order[:held])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 grey levels -> 0..255 uint8 so every source shares one preprocessing path.
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _spec_for(data: str, input_size: int | None, channels: int, names: list[str]) -> DatasetSpec:
    if data == "fashion-mnist":
        size = input_size or 28
        return DatasetSpec(data, names, 1, (size, size), (0.2860,), (0.3530,), hflip=True)
    if data == "digits":
        size = input_size or 8
        return DatasetSpec(data, names, 1, (size, size), (0.3,), (0.38,), hflip=False)
    size = input_size or 224
    if channels == 1:
        return DatasetSpec(str(data), names, 1, (size, size), (0.5,), (0.25,))
    return DatasetSpec(str(data), names, 3, (size, size), IMAGENET_MEAN, IMAGENET_STD)


def _folder_splits(root: Path) -> list[str]:
    return [s for s in SPLITS if (root / s).is_dir()]


def _folder_split_root(root: Path, split: str) -> Path:
    """``DIR/<split>``; ``DIR`` itself when it has no split subfolders at all."""
    found = _folder_splits(root)
    if not found:
        return root
    if split not in found:
        hint = " (val/ is the split train validates on: --split val)" if "val" in found else ""
        raise DataError(f"--data {root}: no {split}/ folder, only {', '.join(found)}{hint}")
    return root / split


def default_eval_split(data: str) -> str:
    """The split ``eval`` reports on when not told: ``test`` for the built-in sets and for
    folders with ``DIR/test``, else ``val`` for folders with ``DIR/val``, else ``all`` (a
    folder without split subfolders: every image, training ones included)."""
    if data in BUILTIN_DATASETS:
        return "test"
    found = _folder_splits(Path(data)) if Path(data).is_dir() else []
    if "test" in found:
        return "test"
    return "val" if "val" in found else "all"


def load_split(
    data: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    input_size: int | None = None,
    channels: int = 3,
    class_names: Sequence[str] | None = None,
) -> tuple[Dataset, DatasetSpec]:
    """The ``train``, ``val`` or ``test`` split of ``data`` (without transform) and its spec.

    A folder's split is ``DIR/<split>``; a folder without train/, val/ or test/ subfolders is
    one pool that every split (and ``all``) reads. The built-in sets have train and test; their
    validation images are a held-out share of train (see ``--val-fraction``).
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if data in BUILTIN_DATASETS and split not in ("train", "test"):
        raise DataError(
            f"--data {data} has a train and a test split; its validation images are a "
            "held-out share of train (--val-fraction), not a split of their own"
        )
    if data == "fashion-mnist":
        images, labels = load_fashion_mnist(split, data_dir)
        names = list(FASHION_MNIST_CLASSES)
        return ImageArrayDataset(images, labels), _spec_for(data, input_size, 1, names)
    if data == "digits":
        images, labels = _digits()
        train, test = split_indices(len(labels), DIGITS_TEST_FRACTION, seed=0)
        chosen = train if split == "train" else test
        names = [str(d) for d in range(10)]
        dataset = ImageArrayDataset(images[chosen], labels[chosen])
        return dataset, _spec_for(data, input_size, 1, names)
    root = Path(data)
    if not root.exists() and os.sep not in data and "." not in data:
        raise DataError(
            f"--data {data!r}: not a built-in data set ({', '.join(BUILTIN_DATASETS)}) "
            "and no such directory"
        )
    if root.is_dir():
        root = _folder_split_root(root, split)
    samples, names = scan_image_folder(root, class_names)
    dataset = FolderDataset(samples, channels)
    return dataset, _spec_for(str(data), input_size, channels, names)
