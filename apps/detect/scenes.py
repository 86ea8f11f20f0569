"""Built-in instance scenes: the segmentation app's Fashion-MNIST scenes, one instance per item.

A scene is drawn exactly as :class:`apps.segment.scenes.SceneGenerator` draws it -- the same
canvas, items, positions and sizes for the same ``(seed, index)``, so the two apps' scenes are
the same images -- and every pasted garment is an instance: its label (Fashion-MNIST class + 1,
so 1..10, 0 being the background), its visible mask (the pixels where it is brighter than the
threshold and no later item covers it) and the tight box around that mask.

An item hidden under later ones for the most part (less than ``min_visible`` of its own
foreground visible) is kept as a *crowd* annotation, COCO's ignore region: training leaves it
out and evaluation neither rewards nor punishes detections on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from apps.segment.scenes import SCENE_CLASSES, SceneConfig

__all__ = ["INSTANCE_CLASSES", "Instance", "InstanceScene", "InstanceSceneGenerator"]

#: Object classes of the scenes, label 1..10 (the segmentation classes without background).
INSTANCE_CLASSES: tuple[str, ...] = SCENE_CLASSES[1:]
#: Fraction of an item's own foreground that must stay visible for it to count as an object.
MIN_VISIBLE = 0.25


@dataclass(frozen=True)
class Instance:
    """One pasted item: label in 1..10, visible mask (H, W) bool, box (x1, y1, x2, y2) in
    pixel-edge coordinates (a one-pixel mask at column x spans x..x+1)."""

    label: int
    mask: np.ndarray
    box: tuple[int, int, int, int]
    crowd: bool = False

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class InstanceScene:
    image: np.ndarray  # uint8 (H, W)
    instances: tuple[Instance, ...]


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


class InstanceSceneGenerator:
    """Deterministic instance scenes from a pool of 28×28 items (see the module docstring).

    images: uint8 (n, h, w) items; labels: int (n,) classes in 0..9.
    ``scene(index)`` → :class:`InstanceScene`.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        config: SceneConfig | None = None,
        seed: int = 0,
        min_visible: float = MIN_VISIBLE,
    ) -> None:
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) == 0:
            raise ValueError(
                f"images must be a non-empty uint8 array (n, h, w), got {images.dtype} "
                f"{images.shape}"
            )
        if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= 10:
            raise ValueError(f"labels must be ({len(images)},) classes in 0..9")
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
        self.images, self.labels = images, labels.astype(np.int64)
        self.config = config or SceneConfig()
        self.seed, self.min_visible = int(seed), float(min_visible)

    def scene(self, index: int) -> InstanceScene:
        cfg, size = self.config, self.config.canvas
        # The random draws below are the segmentation scenes', in the same order.
        rng = np.random.default_rng([self.seed, int(index)])
        canvas = rng.normal(0.0, cfg.noise, (size, size)).clip(0, 255)
        owner = np.zeros((size, size), np.int32)  # 1 + index of the item seen at each pixel
        pasted: list[tuple[int, int]] = []  # (label, own foreground pixels)
        for _ in range(rng.integers(cfg.min_items, cfg.max_items + 1)):
            item = int(rng.integers(len(self.images)))
            side = int(rng.integers(cfg.min_size, cfg.max_size + 1))
            pixels = np.asarray(
                Image.fromarray(self.images[item]).resize((side, side), Image.BILINEAR)
            )
            margin = int(cfg.max_outside * side)
            top = int(rng.integers(-margin, max(size - side + margin, -margin) + 1))
            left = int(rng.integers(-margin, max(size - side + margin, -margin) + 1))
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + side, size), min(left + side, size)
            if y1 <= y0 or x1 <= x0:
                continue
            patch = pixels[y0 - top : y1 - top, x0 - left : x1 - left]
            foreground = patch > cfg.threshold
            canvas[y0:y1, x0:x1][foreground] = patch[foreground]
            owner[y0:y1, x0:x1][foreground] = len(pasted) + 1
            pasted.append((int(self.labels[item]) + 1, int(foreground.sum())))
        instances = []
        for k, (label, own) in enumerate(pasted):
            mask = owner == k + 1
            visible = int(mask.sum())
            if visible == 0:
                continue
            crowd = visible < self.min_visible * own
            instances.append(Instance(label, mask, _box(mask), crowd))
        return InstanceScene(np.rint(canvas).astype(np.uint8), tuple(instances))
