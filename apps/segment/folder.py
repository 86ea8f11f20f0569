"""A user's segmentation folder: ``images/`` and ``masks/`` with matching file stems.

    root/
      images/  a.jpg  b.png ...      RGB or grey images (png, jpg, jpeg, bmp, tif, tiff, webp)
      masks/   a.png  b.png ...      single-channel index PNGs: pixel value = class id
      classes.txt                    optional: one class name per line, line i = class i

Pixels equal to ``ignore_index`` (default 255) carry no label. :func:`scan_folder` opens every
pair once and collects *all* problems -- an image without a mask or the reverse, a file that
does not decode, a mask that is not single-channel, image and mask of different sizes, a class
id outside the declared classes -- and reports them together, so a user fixes a folder in one
pass instead of one crash at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "FolderDatasetError", "SegmentationFolder", "scan_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_INDEX_MODES = ("L", "P", "I", "I;16")
_MAX_LISTED = 30


class FolderDatasetError(ValueError):
    """The folder is unusable; the message lists every problem found."""


def _listing(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    text = "\n".join(f"  - {p}" for p in shown)
    return text + (f"\n  ... and {more} more" if more > 0 else "")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3) from any image file PIL decodes."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Index mask int64 (H, W); raises ValueError for a mask that is not single-channel."""
    with Image.open(path) as img:
        if img.mode not in _INDEX_MODES:
            raise ValueError(
                f"mode {img.mode} is not an index mask (expected a single-channel PNG: "
                f"{', '.join(_INDEX_MODES)})"
            )
        return np.asarray(img).astype(np.int64)


@dataclass
class SegmentationFolder:
    """Validated pairs of a folder. ``load(i)`` → (RGB uint8 (H, W, 3), int64 mask (H, W))."""

    root: Path
    pairs: list[tuple[Path, Path]]
    class_names: tuple[str, ...]
    ignore_index: int
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        return read_image(image_path), read_mask(mask_path)


def _read_class_names(path: Path) -> tuple[str, ...]:
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise FolderDatasetError(f"{path} is empty: expected one class name per line")
    if len(set(names)) != len(names):
        raise FolderDatasetError(f"{path} repeats a class name: {names}")
    return names


def _files_by_stem(directory: Path, suffixes: tuple[str, ...]) -> tuple[dict[str, Path], list]:
    by_stem: dict[str, Path] = {}
    problems = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in by_stem:
            problems.append(f"{path.name}: same stem as {by_stem[path.stem].name}")
            continue
        by_stem[path.stem] = path
    return by_stem, problems


def scan_folder(
    root: str | os.PathLike,
    *,
    num_classes: int | None = None,
    ignore_index: int = 255,
    skip_bad: bool = False,
) -> SegmentationFolder:
    """Pair ``images/`` with ``masks/`` by stem and check every pair.

    The classes come from ``classes.txt`` if present, else ``num_classes``, else the largest id
    found in the masks + 1 (names "class_0", ...). With skip_bad=False any problem raises
    :class:`FolderDatasetError` listing all of them; with skip_bad=True bad pairs are dropped
    and listed in ``skipped`` (an error is still raised if nothing usable remains).
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise FolderDatasetError(
                f"{d} is not a directory: a segmentation folder needs images/ and masks/ "
                f"subdirectories with matching file stems (got root {root})"
            )
    if not 0 <= ignore_index <= 65535:
        raise FolderDatasetError(f"ignore_index must be in 0..65535, got {ignore_index}")
    class_names: tuple[str, ...] | None = None
    if (root / "classes.txt").is_file():
        class_names = _read_class_names(root / "classes.txt")
        if num_classes is not None and num_classes != len(class_names):
            raise FolderDatasetError(
                f"num_classes={num_classes} disagrees with {root / 'classes.txt'} "
                f"({len(class_names)} names)"
            )
        num_classes = len(class_names)
    if num_classes is not None and num_classes < 1:
        raise FolderDatasetError(f"num_classes must be >= 1, got {num_classes}")

    images, problems = _files_by_stem(images_dir, IMAGE_SUFFIXES)
    masks, mask_problems = _files_by_stem(masks_dir, (".png",))
    problems += mask_problems
    for stem in sorted(set(images) - set(masks)):
        problems.append(f"{images[stem].name}: no mask masks/{stem}.png")
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"masks/{masks[stem].name}: no image with stem {stem!r} in images/")

    pairs: list[tuple[Path, Path]] = []
    max_id = -1
    for stem in sorted(set(images) & set(masks)):
        image_path, mask_path = images[stem], masks[stem]
        try:
            with Image.open(image_path) as img:
                img.load()
                image_size = img.size
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            problems.append(f"images/{image_path.name}: cannot decode ({exc})")
            continue
        try:
            mask = read_mask(mask_path)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            problems.append(f"masks/{mask_path.name}: cannot use ({exc})")
            continue
        if (mask.shape[1], mask.shape[0]) != image_size:
            problems.append(
                f"{stem}: image is {image_size[0]}x{image_size[1]} but mask is "
                f"{mask.shape[1]}x{mask.shape[0]} (width x height)"
            )
            continue
        ids = np.unique(mask)
        ids = ids[ids != ignore_index]
        if num_classes is not None and len(ids) and ids.max() >= num_classes:
            bad = ids[ids >= num_classes].tolist()
            problems.append(
                f"masks/{mask_path.name}: class ids {bad} outside 0..{num_classes - 1} "
                f"(and not the ignore index {ignore_index})"
            )
            continue
        if len(ids):
            max_id = max(max_id, int(ids.max()))
        pairs.append((image_path, mask_path))

    if problems and not skip_bad:
        raise FolderDatasetError(
            f"{len(problems)} problem(s) in segmentation folder {root}:\n{_listing(problems)}\n"
            "Fix or remove these files, or pass --skip-bad to train on the valid pairs only."
        )
    if not pairs:
        detail = f":\n{_listing(problems)}" if problems else ""
        raise FolderDatasetError(f"no usable image/mask pairs in {root}{detail}")
    if class_names is None:
        count = num_classes if num_classes is not None else max_id + 1
        class_names = tuple(f"class_{i}" for i in range(max(count, 1)))
    return SegmentationFolder(root, pairs, class_names, ignore_index, problems)
