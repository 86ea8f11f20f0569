"""Colours for class masks: a fixed palette, colour-coded index PNGs and overlays.

The palette is the PASCAL VOC bit-interleaving scheme (class 0 black, then well separated
hues); it is deterministic, so the same class gets the same colour in every image and run.
Masks are written as palette ("P" mode) PNGs: viewers show colours while the pixel values stay
the class ids, so a predicted mask can be read back as a label map.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["colorize", "overlay", "palette", "save_index_png"]


def palette(num_classes: int) -> np.ndarray:
    """uint8 (num_classes, 3) colours; class c's bits are spread over the high bits of R, G, B."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for c in range(num_classes):
        r = g = b = 0
        label = c
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colours[c] = (r, g, b)
    return colours


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """int (H, W) class ids → uint8 (H, W, 3) colours (ids outside the classes: white)."""
    table = np.vstack([palette(num_classes), np.full((1, 3), 255, np.uint8)])
    ids = np.where((mask >= 0) & (mask < num_classes), mask, num_classes)
    return table[ids]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5):
    """Blend the colour-coded mask over an RGB uint8 image; background (class 0) left as is."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    colours = colorize(mask, num_classes).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    out = np.where((mask > 0)[..., None], blended, image.astype(np.float32))
    return np.rint(out).clip(0, 255).astype(np.uint8)


def save_index_png(mask: np.ndarray, path: str | os.PathLike, num_classes: int) -> None:
    """Class ids as a palette PNG (values = ids, colours from :func:`palette`)."""
    if num_classes > 256:
        Image.fromarray(mask.astype(np.uint16)).save(path)
        return
    img = Image.fromarray(mask.astype(np.uint8))  # mode L; putpalette turns it into P
    flat = np.zeros((256, 3), np.uint8)
    flat[:num_classes] = palette(num_classes)
    img.putpalette(flat.ravel().tolist())
    img.save(path)
