"""COCO-format instance data: reading with validation, and writing.

    DIR/images/             the image files (file_name in the JSON is relative to it)
    DIR/instances_*.json    COCO "instances" annotations (or DIR/annotations/instances_*.json)

An annotation needs a box (``bbox`` = x, y, width, height in pixels) and a mask
(``segmentation``: polygons, or RLE -- compressed or not); ``iscrowd`` annotations are ignore
regions (left out of training, handled by COCO's evaluation). Category ids may be any integers:
they are mapped to contiguous labels 1..K in increasing id order, and back when results are
written.

:func:`read_coco` checks everything before training starts -- a listed image that is missing or
of another size than the JSON says, a box outside its image or of zero size, a mask that is
empty or malformed, an unknown image or category id -- and reports all problems in one error,
each line naming the image file (or the JSON entry) concerned. With ``skip_bad`` the bad
annotations (and missing images) are left out and listed instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

__all__ = [
    "CocoData",
    "CocoDatasetError",
    "CocoImage",
    "annotation_files",
    "encode_mask",
    "read_coco",
    "write_coco",
]

_MAX_LISTED = 30
#: A box may overhang its image by this much (COCO's float boxes sometimes do, by rounding).
BOX_TOLERANCE = 1.0


class CocoDatasetError(ValueError):
    """The annotations are unusable; the message lists every problem found."""


@dataclass(frozen=True)
class CocoImage:
    id: int
    path: Path
    width: int
    height: int


@dataclass
class CocoData:
    """The valid part of a COCO annotation file.

    ``annotations[image_id]`` are the raw annotation dicts of that image; ``categories`` are
    (id, name) sorted by id, label k (1-based) being ``categories[k - 1]``.
    """

    annotation_file: Path
    images: list[CocoImage]
    annotations: dict[int, list[dict[str, Any]]]
    categories: list[tuple[int, str]]
    skipped: list[str] = field(default_factory=list)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.categories)

    @property
    def category_ids(self) -> list[int]:
        return [cid for cid, _ in self.categories]

    def label_of(self) -> dict[int, int]:
        return {cid: k + 1 for k, (cid, _) in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.images)

    def instances(self, index: int) -> list[tuple[int, np.ndarray, bool]]:
        """(label, mask uint8 (H, W), crowd) of each annotation of image ``index``."""
        image = self.images[index]
        labels = self.label_of()
        return [
            (labels[a["category_id"]], decode_mask(a["segmentation"], image), bool(a["iscrowd"]))
            for a in self.annotations.get(image.id, [])
        ]


def annotation_files(root: str | os.PathLike) -> list[Path]:
    """The ``instances_*.json`` files of a dataset folder (also under ``annotations/``)."""
    root = Path(root)
    return sorted(root.glob("instances_*.json")) + sorted(root.glob("annotations/instances_*.json"))


def _listing(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    return "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rles(segmentation: object, image: CocoImage) -> list[dict]:
    """pycocotools RLEs of a polygon list or an RLE dict; ValueError if malformed."""
    h, w = image.height, image.width
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list)]
        if not polygons or len(polygons) != len(segmentation):
            raise ValueError("polygons must be a non-empty list of coordinate lists")
        for p in polygons:
            if len(p) < 6 or len(p) % 2 or not all(map(_is_number, p)):
                raise ValueError("a polygon needs at least 3 points (x, y pairs of numbers)")
        return mask_utils.frPyObjects(polygons, h, w)
    if isinstance(segmentation, Mapping) and {"size", "counts"} <= set(segmentation):
        if list(segmentation["size"]) != [h, w]:
            raise ValueError(f"RLE size {segmentation['size']} is not the image's [{h}, {w}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise ValueError(f"uncompressed RLE counts must sum to {h}x{w} pixels")
            return [mask_utils.frPyObjects(dict(segmentation), h, w)]
        if isinstance(counts, str | bytes):
            text = counts.encode() if isinstance(counts, str) else counts
            return [{"size": [h, w], "counts": text}]
    raise ValueError("segmentation must be polygons or an RLE {'size', 'counts'}")


def decode_mask(segmentation: object, image: CocoImage) -> np.ndarray:
    """uint8 (H, W) mask of a (validated) segmentation."""
    rles = _rles(segmentation, image)
    return mask_utils.decode(mask_utils.merge(rles) if len(rles) > 1 else rles[0])


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A compressed RLE of a (H, W) mask, JSON-ready (``counts`` as text)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _annotation_problem(ann: dict, image: CocoImage) -> str | None:
    """Why an annotation of ``image`` is unusable, or None."""
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
        return f"bbox must be 4 numbers [x, y, width, height], got {box!r}"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"degenerate box {box} (width and height must be > 0)"
    tol = BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > image.width + tol or y + h > image.height + tol:
        return f"box {box} extends outside the {image.width}x{image.height} image"
    if "segmentation" not in ann:
        return "no segmentation (Mask R-CNN needs a mask for every instance)"
    try:
        rles = _rles(ann["segmentation"], image)
    except (ValueError, TypeError, OverflowError) as exc:
        return f"malformed segmentation: {exc}"
    if int(mask_utils.area(mask_utils.merge(rles) if len(rles) > 1 else rles[0])) == 0:
        return "empty mask (its polygons or RLE cover no pixel)"
    return None


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CocoDatasetError(f"{path}: not a readable JSON file ({exc})") from None
    keys = ("images", "annotations", "categories")
    wrong = [k for k in keys if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if wrong:
        raise CocoDatasetError(f"{path}: a COCO instances file needs the lists {wrong} at its top")
    return data


def _categories(path: Path, data: dict) -> list[tuple[int, str]]:
    cats, problems = {}, []
    for i, c in enumerate(data["categories"]):
        if not (isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str)):
            problems.append(f"categories[{i}]: needs an integer id and a name, got {c!r}")
        elif c["id"] in cats:
            problems.append(f"categories[{i}]: id {c['id']} is listed twice")
        else:
            cats[c["id"]] = c["name"]
    if problems or not cats:
        raise CocoDatasetError(f"{path}: bad categories:\n{_listing(problems or ['none listed'])}")
    return sorted(cats.items())


def _images(path: Path, data: dict, images_dir: Path) -> tuple[dict[int, CocoImage], list[str]]:
    images, problems = {}, []
    for i, im in enumerate(data["images"]):
        ok = isinstance(im, dict) and _is_int(im.get("id")) and isinstance(im.get("file_name"), str)
        size_ok = ok and _is_int(im.get("width")) and _is_int(im.get("height"))
        if not size_ok or im["width"] < 1 or im["height"] < 1 or im["id"] in images:
            problems.append(f"{path.name}: images[{i}] needs a new integer id, a file_name and a "
                            f"positive width and height, got {im!r}")  # fmt: skip
            continue
        file = images_dir / im["file_name"]
        entry = CocoImage(im["id"], file, im["width"], im["height"])
        try:
            with Image.open(file) as img:
                found = img.size
        except FileNotFoundError:
            problems.append(f"{im['file_name']}: missing (listed as image {im['id']})")
            continue
        except (OSError, UnidentifiedImageError) as exc:
            problems.append(f"{im['file_name']}: cannot decode ({exc})")
            continue
        if found != (entry.width, entry.height):
            problems.append(
                f"{im['file_name']}: the file is {found[0]}x{found[1]} but the annotations say "
                f"{entry.width}x{entry.height}"
            )
            continue
        images[entry.id] = entry
    return images, problems


def read_coco(
    annotation_file: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    skip_bad: bool = False,
    categories: Sequence[tuple[int, str]] | None = None,
) -> CocoData:
    """Parse and check a COCO instances file whose images are in ``images_dir``.

    ``categories``: those of the training split, which a validation split must use (its own
    must agree). Raises :class:`CocoDatasetError` listing every problem, unless ``skip_bad``
    (then the bad entries are dropped and listed in ``skipped``).
    """
    path = Path(annotation_file)
    data = _load_json(path)
    own = _categories(path, data)
    if categories is not None and list(categories) != own:
        raise CocoDatasetError(
            f"{path}: its categories {own[:5]}... differ from the training data's "
            f"{list(categories)[:5]}..."
        )
    images, problems = _images(path, data, Path(images_dir))
    known_images = {im["id"] for im in data["images"] if isinstance(im, dict) and "id" in im}
    cat_ids = {cid for cid, _ in own}
    annotations: dict[int, list[dict]] = {}
    for i, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        where = f"{path.name}: annotations[{i}]"
        if image_id not in known_images:
            problems.append(f"{where}: unknown image id {image_id!r}")
            continue
        if image_id not in images:  # the image itself is bad: reported above
            continue
        image = images[image_id]
        what = f"{image.path.name}: annotation {ann.get('id', i)}"
        if ann.get("category_id") not in cat_ids:
            problems.append(f"{what}: unknown category id {ann.get('category_id')!r}")
            continue
        problem = _annotation_problem(ann, image)
        if problem is not None:
            problems.append(f"{what}: {problem}")
            continue
        ann = {**ann, "iscrowd": int(bool(ann.get("iscrowd", 0)))}
        annotations.setdefault(image_id, []).append(ann)
    if problems and not skip_bad:
        raise CocoDatasetError(
            f"{len(problems)} problem(s) in {path} (images in {images_dir}):\n"
            f"{_listing(problems)}\n"
            "Fix these entries, or pass --skip-bad to leave them out."
        )
    if not images:
        raise CocoDatasetError(f"{path}: no usable image:\n{_listing(problems or ['none listed'])}")
    ordered = [images[k] for k in sorted(images)]
    return CocoData(path, ordered, annotations, own, problems)


def write_coco(
    path: str | os.PathLike,
    images: Sequence[tuple[str, int, int]],
    instances: Sequence[Sequence[tuple[int, np.ndarray, bool]]],
    class_names: Sequence[str],
) -> Path:
    """Write an instances JSON: ``images`` (file_name, width, height), per image its
    instances (label 1..K, mask (H, W), crowd); category id k is label k."""
    entries, annotations = [], []
    pairs = zip(images, instances, strict=True)
    for image_id, ((name, width, height), objects) in enumerate(pairs):
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for label, mask, crowd in objects:
            rle = encode_mask(mask)
            compressed = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            box = [float(v) for v in mask_utils.toBbox(compressed)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": box,
                    "area": int(mask_utils.area(compressed)),
                    "segmentation": rle,
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]
    document = {"images": entries, "annotations": annotations, "categories": categories}
    path = Path(path)
    path.write_text(json.dumps(document))
    return path
