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

from apps.segment.scenes import SCENE_CLASSES, SceneConfig, SceneGenerator

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
        # The segmentation scenes draw the canvases (same inputs checked, same random draws,
        # same pixels); this class turns what they pasted into instances.
        self.drawing = SceneGenerator(images, labels, config, seed)
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
        self.min_visible = float(min_visible)

    @property
    def config(self) -> SceneConfig:
        return self.drawing.config

    def scene(self, index: int) -> InstanceScene:
        canvas, owner, pasted = self.drawing.paste(index)
        instances = []
        for k, (label, own) in enumerate(pasted):
            mask = owner == k + 1
            visible = int(mask.sum())
            if visible == 0:
                continue
            crowd = visible < self.min_visible * own
            instances.append(Instance(label, mask, _box(mask), crowd))
        return InstanceScene(np.rint(canvas).astype(np.uint8), tuple(instances))
