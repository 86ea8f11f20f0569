"""Decoding image files to 8-bit pixels, the same way for every app and every PIL mode.

``PIL.Image.convert("L")`` or ``("RGB")`` clips 16-bit and 32-bit data instead of scaling it
(a 16-bit PNG comes out almost white) and drops alpha without looking at it. The apps feed
8-bit pixels to their models, so :func:`decode_image` maps each mode to 0..255 explicitly:

======================  ====================================================================
mode                    how it becomes 8-bit
======================  ====================================================================
``1``, ``L``            as stored (``1``: 0 or 255)
``I;16`` (any order)    16-bit range: ``round(v / 257)``, so 65535 -> 255
``I`` (32-bit int)      values within 0..65535 are 16-bit data (16-bit files open as ``I``
                        in older Pillow versions): ``round(v / 257)``; otherwise the whole
                        int32 range maps linearly onto 0..255. Never a per-image min/max
                        stretch: the same value must give the same pixel in every file.
``F`` (32-bit float)    floats in [0, 1]: ``round(v * 255)``; values outside are clipped and
                        NaN is 0 -- same reason, no per-image stretch
``LA``, ``RGBA``, ``P``  alpha is composited on black (``round(c * a / 255)``): a transparent
with transparency       pixel is black whatever colour it stores, as the background of a
                        dark-background set (Fashion-MNIST) or a padded border would be
``CMYK``                ``round((255 - c) * (255 - k) / 255)`` per channel (no ICC profile)
others                  PIL's conversion to RGB
======================  ====================================================================

Grey results become RGB by repeating the channel; RGB becomes grey with PIL's ITU-R 601-2 luma
(integer weights as in Pillow), so an 8-bit RGB file decodes exactly as ``convert("L")`` did.
Segmentation masks are not images: :func:`decode_index_mask` returns their stored integers.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["INDEX_MASK_MODES", "decode_image", "decode_index_mask", "to_uint8"]

#: PIL modes whose pixel values are class ids (single channel, integer).
INDEX_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def _round8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _composite_on_black(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C + 1) uint8 with alpha last -> (H, W, C) premultiplied (black background)."""
    colour = pixels[..., :-1].astype(np.float64)
    alpha = pixels[..., -1:].astype(np.float64)
    out = _round8(colour * alpha / 255.0)
    return out[..., 0] if out.shape[-1] == 1 else out


def _int32_to_uint8(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    if values.size == 0 or (values.min() >= 0 and values.max() <= 65535):
        return _round8(values / 257.0)
    return _round8((values + 2.0**31) * (255.0 / (2.0**32 - 1)))


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("L", "RGB", "P") and "transparency" in img.info


def to_uint8(img: Image.Image) -> np.ndarray:
    """The pixels of an opened image as uint8: (H, W) for grey modes, (H, W, 3) otherwise.

    See the module docstring for how each mode is mapped.
    """
    mode = img.mode
    if mode in _ALPHA_MODES or _has_transparency(img):
        grey = mode in ("L", "LA", "La")
        return _composite_on_black(np.asarray(img.convert("LA" if grey else "RGBA")))
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))
    if mode.startswith("I;16"):
        return _round8(np.asarray(img).astype(np.float64) / 257.0)
    if mode == "I":
        return _int32_to_uint8(np.asarray(img))
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return _round8(np.clip(values, 0.0, 1.0) * 255.0)
    if mode == "CMYK":
        cmyk = np.asarray(img).astype(np.float64)
        return _round8((255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0)
    if mode == "RGB":
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L: ITU-R 601-2 with 16-bit fixed-point weights, rounded."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def decode_image(path: str | os.PathLike, channels: int | None = None) -> np.ndarray:
    """uint8 (H, W, C) pixels of an image file; raises what PIL raises for unreadable ones.

    channels: 1 (grey) or 3 (RGB); None keeps the file's own (1 for grey modes, else 3).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with Image.open(path) as img:
        pixels = to_uint8(img)
    if channels == 1 and pixels.ndim == 3:
        pixels = _luma(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
        if channels == 3:
            pixels = np.repeat(pixels, 3, axis=2)
    # PIL's buffer is read-only; torch.from_numpy warns about (and must not share) such arrays.
    pixels = np.ascontiguousarray(pixels)
    return pixels if pixels.flags.writeable else pixels.copy()


def decode_index_mask(path: str | os.PathLike) -> np.ndarray:
    """int64 (H, W) class ids exactly as stored, 8- or 16-bit or 32-bit integer; never scaled.

    Raises ValueError for a mode that does not hold one integer per pixel (RGB, LA, F, ...).
    """
    with Image.open(path) as img:
        if img.mode not in INDEX_MASK_MODES:
            raise ValueError(
                f"mode {img.mode} is not an index mask (expected a single-channel integer "
                f"PNG: {', '.join(INDEX_MASK_MODES)})"
            )
        return np.asarray(img).astype(np.int64)
