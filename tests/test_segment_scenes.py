"""Built-in scenes: determinism, exact masks consistent with the pasted pixels, occlusion."""

from __future__ import annotations

import numpy as np
import pytest

from apps.segment.data import SceneSource
from apps.segment.scenes import SCENE_CLASSES, SceneConfig, SceneGenerator


def _solid_pool():
    """Item k of class k: a full square of grey level 100 + 10k (the level encodes the class)."""
    images = np.stack([np.full((28, 28), 100 + 10 * k, np.uint8) for k in range(10)])
    return images, np.arange(10)


def test_same_seed_and_index_give_the_same_scene():
    images, labels = _solid_pool()
    a = SceneGenerator(images, labels, seed=3)
    b = SceneGenerator(images, labels, seed=3)
    for i in (0, 7, 123):
        np.testing.assert_array_equal(a.scene(i)[0], b.scene(i)[0])
        np.testing.assert_array_equal(a.scene(i)[1], b.scene(i)[1])
    assert not np.array_equal(a.scene(0)[1], a.scene(1)[1])
    c = SceneGenerator(images, labels, seed=4)
    assert not np.array_equal(a.scene(0)[1], c.scene(0)[1])


def test_every_label_matches_the_visible_item():
    """Without noise a pixel's grey level names the item seen there, so the mask is checkable
    pixel by pixel, occlusions included."""
    images, labels = _solid_pool()
    config = SceneConfig(canvas=48, min_items=3, max_items=5, noise=0.0)
    gen = SceneGenerator(images, labels, config, seed=0)
    overlaps = 0
    for i in range(40):
        image, mask = gen.scene(i)
        assert image.shape == mask.shape == (48, 48)
        expected = np.where(image > 0, (image.astype(int) - 100) // 10 + 1, 0)
        np.testing.assert_array_equal(mask, expected)
        overlaps += len(np.unique(mask)) - 1 < 3  # fewer visible items than pasted: occlusion
    assert overlaps > 0


def test_foreground_is_the_thresholded_item():
    # A single item whose left half is darker than the threshold: only the bright half is labelled.
    item = np.zeros((28, 28), np.uint8)
    item[:, 14:] = 200
    item[:, :14] = 30
    config = SceneConfig(
        canvas=32,
        min_items=1,
        max_items=1,
        min_size=28,
        max_size=28,
        noise=0.0,
        threshold=40,
        max_outside=0.0,
    )
    image, mask = SceneGenerator(item[None], np.array([4]), config).scene(0)
    assert set(np.unique(mask)) == {0, 5}
    np.testing.assert_array_equal(mask == 5, image > 40)
    assert (mask == 5).sum() == 28 * 14


def test_scene_classes_are_background_plus_ten():
    assert len(SCENE_CLASSES) == 11 and SCENE_CLASSES[0] == "background"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"canvas": 4}, "canvas"),
        ({"min_items": 3, "max_items": 2}, "min_items"),
        ({"min_size": 2}, "min_size"),
        ({"max_outside": 1.0}, "max_outside"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SceneConfig(**kwargs)


def test_bad_item_pool_is_refused():
    images, labels = _solid_pool()
    with pytest.raises(ValueError, match="images must be"):
        SceneGenerator(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        SceneGenerator(images, labels[:3])
    with pytest.raises(ValueError, match="labels must be in"):
        SceneGenerator(images, labels + 5)


@pytest.mark.parametrize("cache_bytes", [0, 3 * 2 * 32**2])
def test_scene_source_serves_the_generator_scenes_with_or_without_its_cache(cache_bytes):
    images, labels = _solid_pool()
    generator = SceneGenerator(images, labels, SceneConfig(canvas=32, min_size=8), seed=5)
    source = SceneSource(generator, 10, cache_bytes=cache_bytes)
    assert source.cache_capacity == (3 if cache_bytes else 0)
    for _ in range(2):  # the second pass reads the cached scenes
        for i in range(10):
            image, mask = source[i]
            expected_image, expected_mask = generator.scene(i)
            np.testing.assert_array_equal(image, expected_image)
            np.testing.assert_array_equal(mask, expected_mask)
            assert mask.dtype == np.int64
    assert len(source._cache) == source.cache_capacity
    if cache_bytes:  # cached scenes are shared between reads, so nobody may write into them
        with pytest.raises(ValueError, match="read-only"):
            source[0][0][0, 0] = 1
