"""A user's segmentation folder: ``images/`` and ``masks/`` with matching file stems.

    root/
      images/  a.jpg  b.png ...      RGB or grey images (png, jpg, jpeg, bmp, tif, tiff, webp)
      masks/   a.png  b.png ...      single-channel index PNGs (8 or 16 bit): pixel = class id
      classes.txt                    optional: one class name per line, line i = class i

or, with the validation images kept apart (:func:`folder_layout`)::

    root/
      train/   images/  masks/       the training pairs
      val/     images/  masks/       optional: the validation pairs
      classes.txt                    optional, shared by both splits

Pixels equal to ``ignore_index`` (default 255) carry no label. :func:`scan_folder` opens every
pair once and collects *all* problems -- an image without a mask or the reverse, a file that
does not decode, a mask that is not single-channel, image and mask of different sizes, a class
id outside the declared classes -- and reports them together, so a user fixes a folder in one
pass instead of one crash at a time.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from apps.data.images import decode_image, decode_index_mask

__all__ = [
    "IMAGE_SUFFIXES",
    "FolderDatasetError",
    "FolderLayout",
    "SegmentationFolder",
    "folder_layout",
    "scan_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_MAX_LISTED = 30
_NO_IDS = np.zeros(0, dtype=np.int64)
# Ids counted from the masks: unused ids 0..max beyond this many (and beyond the used ones)
# mean the largest id is most likely a stray value, not a class.
_STRAY_GAP = 8


class FolderDatasetError(ValueError):
    """The folder is unusable; the message lists every problem found."""


def _listing(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    text = "\n".join(f"  - {p}" for p in shown)
    return text + (f"\n  ... and {more} more" if more > 0 else "")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3) from any image file PIL decodes (16-bit data scaled, alpha
    composited on black: see :mod:`apps.data.images`)."""
    return decode_image(path, 3)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Index mask int64 (H, W), ids exactly as stored (8, 16 or 32 bits); raises ValueError
    for a mask that is not single-channel."""
    return decode_index_mask(path)


@dataclass
class SegmentationFolder:
    """Validated pairs of a folder. ``load(i)`` → (RGB uint8 (H, W, 3), int64 mask (H, W))."""

    root: Path
    pairs: list[tuple[Path, Path]]
    class_names: tuple[str, ...]
    ignore_index: int
    skipped: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each pair

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


@dataclass(frozen=True)
class FolderLayout:
    """Where the splits of a ``--data`` folder are: ``train`` always, ``val`` when present."""

    root: Path
    train: Path
    val: Path | None
    classes_file: Path | None  # shared by both splits


def _is_pair_folder(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "masks").is_dir()


def folder_layout(root: str | os.PathLike) -> FolderLayout:
    """``root/images`` + ``root/masks``, or ``root/train`` (+ ``root/val``) holding them.

    A ``classes.txt`` at the root names the classes of both splits; without one, the training
    folder's own ``classes.txt`` (if any) does.
    """
    root = Path(root)
    if not root.is_dir():
        raise FolderDatasetError(f"{root} is not a directory")
    if _is_pair_folder(root) or not (root / "train").is_dir():
        classes = root / "classes.txt"
        return FolderLayout(root, root, None, classes if classes.is_file() else None)
    val = root / "val"
    shared, own = root / "classes.txt", root / "train" / "classes.txt"
    classes = shared if shared.is_file() else own if own.is_file() else None
    return FolderLayout(root, root / "train", val if val.is_dir() else None, classes)


def _class_names_for(
    root: Path, classes_file: Path | None, num_classes: int | None
) -> tuple[tuple[str, ...] | None, int | None]:
    """Names from the classes file (checked against ``num_classes``), else none yet."""
    classes_file = classes_file or root / "classes.txt"
    if not classes_file.is_file():
        return None, num_classes
    class_names = _read_class_names(classes_file)
    if num_classes is not None and num_classes != len(class_names):
        raise FolderDatasetError(
            f"num_classes={num_classes} disagrees with {classes_file} ({len(class_names)} names)"
        )
    return class_names, len(class_names)


def _check_pair(
    stem: str, image_path: Path, mask_path: Path, num_classes: int | None, ignore_index: int
) -> tuple[str | None, tuple[int, int], np.ndarray]:
    """(problem or None, image (width, height), class ids present) of one pair."""
    try:
        with Image.open(image_path) as img:
            img.load()
            image_size = img.size
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"images/{image_path.name}: cannot decode ({exc})", (0, 0), _NO_IDS
    try:
        mask = read_mask(mask_path)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"masks/{mask_path.name}: cannot use ({exc})", image_size, _NO_IDS
    if (mask.shape[1], mask.shape[0]) != image_size:
        return (
            f"{stem}: image is {image_size[0]}x{image_size[1]} but mask is "
            f"{mask.shape[1]}x{mask.shape[0]} (width x height)",
            image_size,
            _NO_IDS,
        )
    ids = np.unique(mask)
    ids = ids[ids != ignore_index]
    if len(ids) and ids.min() < 0:  # only a 32-bit mask can hold them
        bad = ids[ids < 0].tolist()[:10]
        return f"masks/{mask_path.name}: negative class ids {bad}", image_size, _NO_IDS
    if num_classes is not None and len(ids) and ids.max() >= num_classes:
        bad = ids[ids >= num_classes].tolist()
        return (
            f"masks/{mask_path.name}: class ids {bad} outside 0..{num_classes - 1} "
            f"(and not the ignore index {ignore_index})",
            image_size,
            _NO_IDS,
        )
    return None, image_size, ids


def _pair_files(images_dir: Path, masks_dir: Path) -> tuple[list[tuple[str, Path, Path]], list]:
    images, problems = _files_by_stem(images_dir, IMAGE_SUFFIXES)
    masks, mask_problems = _files_by_stem(masks_dir, (".png",))
    problems += mask_problems
    for stem in sorted(set(images) - set(masks)):
        problems.append(f"{images[stem].name}: no mask masks/{stem}.png")
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"masks/{masks[stem].name}: no image with stem {stem!r} in images/")
    return [(s, images[s], masks[s]) for s in sorted(set(images) & set(masks))], problems


def _warn_stray_id(root: Path, used: set[int], max_id: int, mask: str, ignore: int) -> None:
    """Warn when the classes counted from the masks (largest id + 1) are mostly unused.

    One stray value (a 300 among ids 0..4) would otherwise silently give a 301-class model.
    """
    unused = max_id + 1 - len(used)
    if unused <= max(_STRAY_GAP, len(used)):
        return
    print(
        f"warning: {root}: the largest class id in the masks is {max_id} (in masks/{mask}), "
        f"but only {len(used)} of the ids 0..{max_id} occur, so the model would get "
        f"{max_id + 1} classes; if {max_id} is a stray value, fix that mask or make it the "
        f"ignore index (now {ignore}), and name the classes in {root / 'classes.txt'} "
        "(one per line) or give --num-classes",
        file=sys.stderr,
    )


def scan_folder(
    root: str | os.PathLike,
    *,
    num_classes: int | None = None,
    ignore_index: int = 255,
    skip_bad: bool = False,
    classes_file: str | os.PathLike | None = None,
) -> SegmentationFolder:
    """Pair ``images/`` with ``masks/`` by stem and check every pair.

    The classes come from ``classes_file`` (default ``root/classes.txt``) if present, else
    ``num_classes``, else the largest id found in the masks + 1 (names "class_0", ...). With
    skip_bad=False any problem raises :class:`FolderDatasetError` listing all of them; with
    skip_bad=True bad pairs are dropped and listed in ``skipped`` (an error is still raised
    if nothing usable remains).
    """
    root = Path(root)
    for d in (root / "images", root / "masks"):
        if not d.is_dir():
            raise FolderDatasetError(
                f"{d} is not a directory: a segmentation folder needs images/ and masks/ "
                f"subdirectories with matching file stems, or train/ (and val/) folders "
                f"holding them (got root {root})"
            )
    if not 0 <= ignore_index <= 65535:
        raise FolderDatasetError(f"ignore_index must be in 0..65535, got {ignore_index}")
    path = Path(classes_file) if classes_file is not None else None
    class_names, num_classes = _class_names_for(root, path, num_classes)
    if num_classes is not None and num_classes < 1:
        raise FolderDatasetError(f"num_classes must be >= 1, got {num_classes}")

    candidates, problems = _pair_files(root / "images", root / "masks")
    pairs: list[tuple[Path, Path]] = []
    sizes: list[tuple[int, int]] = []
    used: set[int] = set()
    max_id, max_mask = -1, ""
    for stem, image_path, mask_path in candidates:
        problem, size, ids = _check_pair(stem, image_path, mask_path, num_classes, ignore_index)
        if problem is not None:
            problems.append(problem)
            continue
        used.update(ids.tolist())
        if len(ids) and ids.max() > max_id:
            max_id, max_mask = int(ids.max()), mask_path.name
        pairs.append((image_path, mask_path))
        sizes.append(size)

    if problems and not skip_bad:
        raise FolderDatasetError(
            f"{len(problems)} problem(s) in segmentation folder {root}:\n{_listing(problems)}\n"
            "Fix or remove these files, or pass --skip-bad to train on the valid pairs only."
        )
    if not pairs:
        detail = f":\n{_listing(problems)}" if problems else ""
        raise FolderDatasetError(f"no usable image/mask pairs in {root}{detail}")
    if class_names is None and num_classes is None:
        _warn_stray_id(root, used, max_id, max_mask, ignore_index)
    if class_names is None:
        count = num_classes if num_classes is not None else max_id + 1
        class_names = tuple(f"class_{i}" for i in range(max(count, 1)))
    return SegmentationFolder(root, pairs, class_names, ignore_index, problems, sizes)
