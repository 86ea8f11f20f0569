"""Built-in segmentation scenes: Fashion-MNIST items pasted onto a canvas.

Each scene pastes a few garments at random positions and scales onto a dark, slightly noisy
canvas. Every pixel is labelled with the class of the item visible there (Fashion-MNIST class
+ 1, so 1..10) or 0 for background: an 11-class task on real images with exact masks. An item
covers the pixels where its resized image is brighter than ``threshold``; later items occlude
earlier ones, and the label follows what is visible.

Scenes are a pure function of ``(seed, index)`` (NumPy's seeded generator), so any worker or
rank can rebuild any scene, and a run is reproducible without storing images. Training scenes
draw items from the Fashion-MNIST train split, held-out scenes from the test split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from apps.data.fashion_mnist import FASHION_MNIST_CLASSES

__all__ = ["SCENE_CLASSES", "SceneConfig", "SceneGenerator"]

SCENE_CLASSES: tuple[str, ...] = ("background", *FASHION_MNIST_CLASSES)


@dataclass(frozen=True)
class SceneConfig:
    """Scene layout. Sizes in pixels; items are square, side in [min_size, max_size]."""

    canvas: int = 64
    min_items: int = 2
    max_items: int = 4
    min_size: int = 20
    max_size: int = 40
    threshold: int = 40  # uint8 grey level: an item pixel above it is foreground
    noise: float = 8.0  # std of the background's grey-level noise
    max_outside: float = 0.25  # fraction of an item's side allowed to leave the canvas

    def __post_init__(self) -> None:
        if self.canvas < 8:
            raise ValueError(f"canvas must be >= 8 pixels, got {self.canvas}")
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(
                f"need 1 <= min_items <= max_items, got {self.min_items}, {self.max_items}"
            )
        if not 4 <= self.min_size <= self.max_size:
            raise ValueError(
                f"need 4 <= min_size <= max_size, got {self.min_size}, {self.max_size}"
            )
        if not 0 <= self.threshold < 255:
            raise ValueError(f"threshold must be in [0, 255), got {self.threshold}")
        if not 0.0 <= self.max_outside < 1.0:
            raise ValueError(f"max_outside must be in [0, 1), got {self.max_outside}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class SceneGenerator:
    """Deterministic scenes from a pool of 28×28 items.

    images: uint8 (n, h, w) items; labels: int (n,) classes in 0..9 (stored as label + 1).
    ``scene(index)`` → (image uint8 (canvas, canvas), mask uint8 (canvas, canvas) in 0..10).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        config: SceneConfig | None = None,
        seed: int = 0,
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) == 0:
            raise ValueError(
                f"images must be a non-empty uint8 array (n, h, w), got {images.dtype} "
                f"{images.shape}"
            )
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(
                f"labels must be in 0..{len(FASHION_MNIST_CLASSES) - 1}, "
                f"got {labels.min()}..{labels.max()}"
            )
        self.images = images
        self.labels = labels.astype(np.int64)
        self.config = config or SceneConfig()
        self.seed = int(seed)

    def paste(self, index: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """Draw scene ``index``: the float canvas (canvas, canvas); the owner map, int32, 1 + the
        paste order of the item visible at each pixel (0: background); and per pasted item, in
        paste order, (label 1..10, its own foreground pixel count before any occlusion)."""
        cfg = self.config
        rng = np.random.default_rng([self.seed, int(index)])
        size = cfg.canvas
        canvas = rng.normal(0.0, cfg.noise, (size, size)).clip(0, 255)
        owner = np.zeros((size, size), np.int32)
        pasted: list[tuple[int, int]] = []
        for _ in range(rng.integers(cfg.min_items, cfg.max_items + 1)):
            item = int(rng.integers(len(self.images)))
            side = int(rng.integers(cfg.min_size, cfg.max_size + 1))
            pixels = np.asarray(
                Image.fromarray(self.images[item]).resize((side, side), Image.BILINEAR)
            )
            margin = int(cfg.max_outside * side)
            top = int(rng.integers(-margin, max(size - side + margin, -margin) + 1))
            left = int(rng.integers(-margin, max(size - side + margin, -margin) + 1))
            # Clip the item's box to the canvas.
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + side, size), min(left + side, size)
            if y1 <= y0 or x1 <= x0:
                continue
            patch = pixels[y0 - top : y1 - top, x0 - left : x1 - left]
            foreground = patch > cfg.threshold
            canvas[y0:y1, x0:x1][foreground] = patch[foreground]
            owner[y0:y1, x0:x1][foreground] = len(pasted) + 1
            pasted.append((int(self.labels[item]) + 1, int(foreground.sum())))
        return canvas, owner, pasted

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        canvas, owner, pasted = self.paste(index)
        label_of_owner = np.array([0, *(label for label, _ in pasted)], np.uint8)
        return np.rint(canvas).astype(np.uint8), label_of_owner[owner]
