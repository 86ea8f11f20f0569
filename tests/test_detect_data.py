"""Detect app data: instance scenes, COCO files (written, read, remapped, validated), samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from apps.detect.coco import CocoDatasetError, encode_mask, read_coco, write_coco
from apps.detect.data import CocoSource, DetectionSamples, SceneSource
from apps.detect.scenes import INSTANCE_CLASSES, InstanceSceneGenerator
from apps.detect.transforms import TrainAugment
from apps.segment.scenes import SceneConfig, SceneGenerator


def _pool():
    """Item k of class k: a full square of grey level 100 + 10k (the level encodes the class)."""
    images = np.stack([np.full((28, 28), 100 + 10 * k, np.uint8) for k in range(10)])
    return images, np.arange(10)


def _textured_pool(n: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def test_instance_scenes_are_the_segmentation_scenes():
    """Same image for the same (seed, index), and the instances' labels painted over each other
    are the segmentation mask; masks are disjoint and boxes are tight around them."""
    images, labels = _textured_pool()
    config = SceneConfig(canvas=48, min_items=2, max_items=5)
    ours = InstanceSceneGenerator(images, labels, config, seed=3, min_visible=0.0)
    theirs = SceneGenerator(images, labels, config, seed=3)
    for i in range(30):
        scene = ours.scene(i)
        image, semantic = theirs.scene(i)
        np.testing.assert_array_equal(scene.image, image)
        painted = np.zeros_like(semantic)
        for inst in scene.instances:
            assert not painted[inst.mask].any()  # disjoint
            painted[inst.mask] = inst.label
            ys, xs = np.nonzero(inst.mask)
            assert inst.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        np.testing.assert_array_equal(painted, semantic)


def _first_item_pixels(index: int, seed: int, canvas: int, sizes: tuple[int, int]) -> int:
    """Pixels of a scene's first (solid) item inside the canvas, from the generator's draws in
    their documented order: canvas noise, item count, then per item its index, side, position."""
    rng = np.random.default_rng([seed, index])
    rng.normal(0.0, 1.0, (canvas, canvas))
    rng.integers(2, 3)
    rng.integers(10)
    side = int(rng.integers(sizes[0], sizes[1] + 1))
    margin = int(0.25 * side)
    top = int(rng.integers(-margin, max(canvas - side + margin, -margin) + 1))
    left = int(rng.integers(-margin, max(canvas - side + margin, -margin) + 1))
    rows = min(top + side, canvas) - max(top, 0)
    cols = min(left + side, canvas) - max(left, 0)
    return max(rows, 0) * max(cols, 0)


def test_mostly_hidden_items_are_crowd_regions():
    """Two solid items, the second on top: the first is a crowd region exactly when less than
    a quarter of its own pixels remain visible."""
    images, labels = _pool()
    config = SceneConfig(canvas=32, min_items=2, max_items=2, min_size=12, max_size=24, noise=0)
    gen = InstanceSceneGenerator(images, labels, config, seed=0)
    seen = {True: 0, False: 0}
    for i in range(80):
        scene = gen.scene(i)
        for inst in scene.instances:
            level = 100 + 10 * (inst.label - 1)
            assert (scene.image[inst.mask] == level).all()
        if len(scene.instances) == 2:
            first = scene.instances[0]
            own = _first_item_pixels(i, 0, 32, (12, 24))
            assert first.crowd == (first.area < 0.25 * own)
            seen[first.crowd] += 1
    assert seen[True] > 0 and seen[False] > 0


def _write_dataset(tmp_path, category_ids=(5, 17, 90), polygons=True):
    """Two images, three objects of known masks; category ids deliberately not contiguous."""
    (tmp_path / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "images" / "b.jpg")
    square = np.zeros((40, 50), np.uint8)
    square[10:20, 5:25] = 1  # rows 10..19, columns 5..24
    blob = np.zeros((30, 30), np.uint8)
    blob[3:9, 4:30] = 1
    anns = [
        {"id": 1, "image_id": 7, "category_id": category_ids[2], "bbox": [5, 10, 20, 10],
         "segmentation": [[5, 10, 25, 10, 25, 20, 5, 20]] if polygons else encode_mask(square),
         "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": category_ids[0], "bbox": [4, 3, 26, 6],
         "segmentation": encode_mask(blob), "area": 156, "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": category_ids[1], "bbox": [0, 20, 10, 10],
         "segmentation": {"size": [30, 30], "counts": [620, 10] + [20, 10] * 9},
         "area": 100, "iscrowd": 1},
    ]  # fmt: skip
    doc = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 50, "height": 40},
            {"id": 9, "file_name": "b.jpg", "width": 30, "height": 30},
        ],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in category_ids],
    }
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(doc))
    return path, square, blob


def test_coco_file_is_parsed_and_remapped(tmp_path):
    path, square, blob = _write_dataset(tmp_path)
    data = read_coco(path, tmp_path / "images")
    assert data.class_names == ("c5", "c17", "c90") and data.category_ids == [5, 17, 90]
    assert data.label_of() == {5: 1, 17: 2, 90: 3}
    source = CocoSource(data)
    image, instances = source.load(0)
    assert image.shape == (40, 50, 3)
    ((label, mask, box, crowd),) = [(i.label, i.mask, i.box, i.crowd) for i in instances]
    assert (label, box, crowd) == (3, (5, 10, 25, 20), False)
    # pycocotools rasterises the polygon's outline pixels too: at least the square, a pixel more
    assert mask[square.astype(bool)].all() and mask.sum() <= (21 * 11)
    _, instances = source.load(1)
    np.testing.assert_array_equal(instances[0].mask, blob.astype(bool))
    # uncompressed RLE, column-major runs: 620 zeros (columns 0..19 and 20 rows), then 10 ones, ...
    crowd_mask = np.zeros((30, 30), bool)
    crowd_mask[20:30, 20:30] = True
    np.testing.assert_array_equal(instances[1].mask, crowd_mask)
    assert [(i.label, i.crowd) for i in instances] == [(1, False), (2, True)]
    # crowd regions are not trained on, but scored as ignore regions
    _, _, target = DetectionSamples(source)[1]
    assert target["labels"].tolist() == [1]
    width, height, gt = source.ground_truth(1)
    assert (width, height) == (30, 30) and [g["iscrowd"] for g in gt] == [0, 1]
    assert [g["category_id"] for g in gt] == [1, 2]


def test_written_coco_round_trips(tmp_path):
    images, labels = _textured_pool()
    scenes = SceneSource(InstanceSceneGenerator(images, labels, SceneConfig(canvas=40), 1), 6)
    (tmp_path / "images").mkdir()
    entries, objects = [], []
    for i in range(len(scenes)):
        image, instances = scenes.load(i)
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
        entries.append((f"{i}.png", 40, 40))
        objects.append([(o.label, o.mask, o.crowd) for o in instances])
    path = write_coco(tmp_path / "instances_x.json", entries, objects, INSTANCE_CLASSES)
    source = CocoSource(read_coco(path, tmp_path / "images"))
    for i in range(len(scenes)):
        image, instances = source.load(i)
        expected_image, expected = scenes.load(i)
        np.testing.assert_array_equal(image[..., 0], expected_image)
        assert [(o.label, o.crowd) for o in instances] == [(o.label, o.crowd) for o in expected]
        for got, want in zip(instances, expected, strict=True):
            np.testing.assert_array_equal(got.mask, want.mask)
            assert got.box == want.box
        assert source.ground_truth(i)[2] == scenes.ground_truth(i)[2]


def test_bad_annotations_are_all_listed_by_file(tmp_path):
    path, _, _ = _write_dataset(tmp_path)
    doc = json.loads(path.read_text())
    doc["images"].append({"id": 11, "file_name": "gone.png", "width": 8, "height": 8})
    doc["images"].append({"id": 12, "file_name": "b.jpg", "width": 31, "height": 30})
    good = doc["annotations"][0]
    doc["annotations"] += [
        {**good, "id": 20, "bbox": [40, 30, 20, 20]},  # beyond the 50x40 image
        {**good, "id": 21, "bbox": [5, 5, 0, 4]},  # zero width
        {**good, "id": 22, "segmentation": [[1, 1, 2, 2]]},  # two points
        {**good, "id": 23, "segmentation": {"size": [40, 50], "counts": [2000]}},  # empty
        {**good, "id": 24, "category_id": 3},  # unknown category
        {**good, "id": 25, "image_id": 99},  # unknown image
        {**good, "id": 26, "segmentation": {"size": [30, 30], "counts": [900]}},  # wrong size
    ]
    path.write_text(json.dumps(doc))
    with pytest.raises(CocoDatasetError) as info:
        read_coco(path, tmp_path / "images")
    text = str(info.value)
    assert "9 problem(s)" in text and "--skip-bad" in text
    for expected in (
        "gone.png: missing (listed as image 11)",
        "b.jpg: the file is 30x30 but the annotations say 31x30",
        "a.png: annotation 20: box [40, 30, 20, 20] extends outside the 50x40 image",
        "a.png: annotation 21: degenerate box",
        "a.png: annotation 22: malformed segmentation: a polygon needs at least 3 points",
        "a.png: annotation 23: empty mask",
        "a.png: annotation 24: unknown category id 3",
        "instances_train.json: annotations[8]: unknown image id 99",
        "a.png: annotation 26: malformed segmentation: RLE size [30, 30]",
    ):
        assert expected in text, expected
    data = read_coco(path, tmp_path / "images", skip_bad=True)
    assert len(data.skipped) == 9
    assert [im.path.name for im in data.images] == ["a.png", "b.jpg"]
    assert [a["id"] for a in data.annotations[7]] == [1]


def test_unreadable_json_and_category_mismatch(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "instances_bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoDatasetError, match="instances_bad.json: not a readable JSON"):
        read_coco(bad, tmp_path / "images")
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(CocoDatasetError, match=r"needs the lists \['annotations', 'categories'\]"):
        read_coco(bad, tmp_path / "images")
    path, _, _ = _write_dataset(tmp_path / "other")
    with pytest.raises(CocoDatasetError, match="differ from the training data's"):
        read_coco(path, tmp_path / "other" / "images", categories=[(1, "x")])


def test_rle_encoding_is_pycocotools(tmp_path):
    mask = np.zeros((7, 9), np.uint8)
    mask[2:5, 3:8] = 1
    rle = encode_mask(mask)
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded, mask)
    assert json.loads(json.dumps(rle)) == rle


def _scenes(count: int = 8) -> SceneSource:
    images, labels = _textured_pool()
    return SceneSource(InstanceSceneGenerator(images, labels, SceneConfig(canvas=40), 2), count)


def test_flips_move_boxes_and_masks_with_the_image():
    source = _scenes()
    plain, flipped = DetectionSamples(source), DetectionSamples(source, TrainAugment(40, 40))
    flips = 0
    for i in range(len(source)):
        _, x0, t0 = plain[i]
        _, x, t = flipped[i]
        if torch.equal(x, x0):
            assert torch.equal(t["boxes"], t0["boxes"])
            continue
        flips += 1
        torch.testing.assert_close(x, x0.flip(-1))
        torch.testing.assert_close(t["masks"], t0["masks"].flip(-1))
        mirrored = torch.stack([40 - t0["boxes"][:, 2], t0["boxes"][:, 1],
                                40 - t0["boxes"][:, 0], t0["boxes"][:, 3]], dim=1)  # fmt: skip
        torch.testing.assert_close(t["boxes"], mirrored)
    assert 0 < flips < len(source)


def test_scale_jitter_is_seeded_per_sample_and_epoch():
    source = _scenes()
    augment = TrainAugment(40, 40, (0.5, 1.5), flip=False)
    samples = DetectionSamples(source, augment, seed=5)
    sizes = set()
    for i in range(len(source)):
        _, x, t = samples[i]
        _, x_again, t_again = DetectionSamples(source, augment, seed=5)[i]
        assert torch.equal(x, x_again) and torch.equal(t["boxes"], t_again["boxes"])
        h, w = x.shape[-2:]
        sizes.add(h)
        assert h == w and 20 <= h <= 60 and t["masks"].shape[-2:] == (h, w)
        _, _, t0 = DetectionSamples(source)[i]
        kept = len(t["boxes"])
        # boxes scale with the image (up to the pixel rounding of the new size)
        torch.testing.assert_close(t["boxes"], t0["boxes"][:kept] * (h / 40), atol=0.0, rtol=0.0)
    assert len(sizes) > 3
    later = DetectionSamples(source, augment, seed=5)
    later.epoch = 1
    assert [later[i][1].shape for i in range(8)] != [samples[i][1].shape for i in range(8)]
