"""Every PIL mode decodes to the 8-bit pixels its data means, in both apps.

Each test writes a file with PIL from a NumPy array and compares the decoded pixels with an
expectation computed from that same array, never with PIL's own conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apps.classify.datasets import read_image as classify_read_image
from apps.data.images import decode_image, decode_index_mask
from apps.segment.folder import read_image as segment_read_image
from apps.segment.folder import read_mask, scan_folder

RNG = np.random.default_rng(0)


def _round8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _grey16() -> np.ndarray:
    values = RNG.integers(0, 65536, size=(6, 7), dtype=np.int64)
    values[0, :3] = (0, 65535, 257)  # the ends and one exact step
    return values


def _both_apps(path, expected_grey: np.ndarray) -> None:
    """Classify (grey and RGB) and segment (RGB) read ``path`` as ``expected_grey``."""
    grey = classify_read_image(path, 1).numpy()
    np.testing.assert_array_equal(grey[0], expected_grey)
    rgb = classify_read_image(path, 3).numpy()
    np.testing.assert_array_equal(rgb, np.repeat(expected_grey[None], 3, axis=0))
    np.testing.assert_array_equal(segment_read_image(path), np.stack([expected_grey] * 3, -1))


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = _grey16()
    path = tmp_path / "a.png"
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    expected = _round8(values / 257.0)
    _both_apps(path, expected)
    assert decode_image(path).shape == (6, 7, 1)


def test_big_endian_16_bit_tiff(tmp_path):
    values = _grey16()
    path = tmp_path / "a.tif"
    Image.fromarray(values.astype(">u2")).save(path)
    assert Image.open(path).mode.startswith("I;16")
    _both_apps(path, _round8(values / 257.0))


def test_32_bit_int_within_16_bits_is_16_bit_data(tmp_path):
    values = _grey16()
    path = tmp_path / "a.tif"
    Image.fromarray(values.astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    _both_apps(path, _round8(values / 257.0))


def test_32_bit_int_beyond_16_bits_spans_the_int32_range(tmp_path):
    values = np.array([[-(2**31), 0, 2**31 - 1], [70000, -5, 2**30]], dtype=np.int64)
    path = tmp_path / "a.tif"
    Image.fromarray(values.astype(np.int32)).save(path)
    expected = _round8((values + 2.0**31) * 255.0 / (2.0**32 - 1))
    _both_apps(path, expected)
    assert expected[0].tolist() == [0, 128, 255]


def test_float_image_is_read_as_0_to_1_and_clipped(tmp_path):
    values = RNG.uniform(-0.5, 1.5, size=(5, 6)).astype(np.float32)
    values[0, 0] = np.nan
    path = tmp_path / "a.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    expected = _round8(np.clip(np.nan_to_num(values.astype(np.float64)), 0, 1) * 255)
    _both_apps(path, expected)


def test_grey_with_alpha_is_composited_on_black(tmp_path):
    la = RNG.integers(0, 256, size=(5, 6, 2), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(la, "LA").save(path)
    expected = _round8(la[..., 0] * (la[..., 1] / 255.0))
    _both_apps(path, expected)


def test_rgba_is_composited_on_black(tmp_path):
    rgba = RNG.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    expected = _round8(rgba[..., :3] * (rgba[..., 3:] / 255.0))
    np.testing.assert_array_equal(segment_read_image(path), expected)
    np.testing.assert_array_equal(classify_read_image(path, 3).numpy(), expected.transpose(2, 0, 1))
    assert segment_read_image(path)[0, 0].tolist() == [0, 0, 0]
    r, g, b = (expected[..., i].astype(np.int64) for i in range(3))
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    np.testing.assert_array_equal(classify_read_image(path, 1).numpy()[0], luma)


def test_palette_with_transparent_entry(tmp_path):
    palette = RNG.integers(0, 256, size=(4, 3), dtype=np.uint8)
    index = RNG.integers(0, 4, size=(5, 6), dtype=np.uint8)
    index[0, 0] = 2
    img = Image.fromarray(index, "P")
    img.putpalette(palette.ravel().tolist())
    path = tmp_path / "a.png"
    img.save(path, transparency=2)
    expected = palette[index]
    expected[index == 2] = 0
    np.testing.assert_array_equal(segment_read_image(path), expected)
    np.testing.assert_array_equal(classify_read_image(path, 3).numpy(), expected.transpose(2, 0, 1))


def test_cmyk_uses_the_subtractive_formula(tmp_path):
    cmyk = RNG.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    path = tmp_path / "a.tif"
    Image.fromarray(cmyk, "CMYK").save(path)
    c = cmyk.astype(np.float64)
    expected = _round8((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)
    np.testing.assert_array_equal(segment_read_image(path), expected)
    np.testing.assert_array_equal(classify_read_image(path, 3).numpy(), expected.transpose(2, 0, 1))


def test_8_bit_files_decode_as_before(tmp_path):
    """RGB and L files keep PIL's values, RGB -> grey included."""
    rgb = RNG.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(segment_read_image(path), rgb)
    old_grey = np.asarray(Image.open(path).convert("L"))
    np.testing.assert_array_equal(classify_read_image(path, 1).numpy()[0], old_grey)


@pytest.mark.parametrize(
    ("dtype", "suffix"), [(np.uint16, ".png"), (">u2", ".tif"), (np.int32, ".tif")]
)
def test_wide_index_masks_keep_their_ids(tmp_path, dtype, suffix):
    ids = RNG.integers(0, 40000, size=(5, 6), dtype=np.int64)
    ids[0, 0] = 65535
    path = tmp_path / f"m{suffix}"
    Image.fromarray(ids.astype(dtype)).save(path)
    np.testing.assert_array_equal(read_mask(path), ids)
    np.testing.assert_array_equal(decode_index_mask(path), ids)


def test_segment_folder_with_16_bit_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = RNG.integers(0, 65536, size=(8, 8), dtype=np.int64)
    mask = RNG.integers(0, 3, size=(8, 8), dtype=np.int64)
    mask[0, 0] = 300  # beyond 8 bits, read as is
    Image.fromarray(image.astype(np.uint16)).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "masks" / "a.png")
    folder = scan_folder(tmp_path, num_classes=301, ignore_index=65535)
    pixels, labels = folder.load(0)
    np.testing.assert_array_equal(labels, mask)
    np.testing.assert_array_equal(pixels[..., 0], _round8(image / 257.0))
