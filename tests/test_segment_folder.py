"""User folders of images/ + masks/: valid pairs load, every problem is listed clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apps.segment.folder import FolderDatasetError, FolderLayout, folder_layout, scan_folder


def _pair(root: Path, stem: str, size=(12, 10), classes=3, seed=0, suffix=".png"):
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.integers(0, classes, (h, w), dtype=np.uint8)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}{suffix}")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return image, mask


def test_valid_folder_loads_pairs_with_class_names(tmp_path):
    image, mask = _pair(tmp_path, "a")
    _pair(tmp_path, "b", seed=1)
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    folder = scan_folder(tmp_path)
    assert folder.class_names == ("sky", "road", "car")
    assert [p[0].name for p in folder.pairs] == ["a.png", "b.png"]
    got_image, got_mask = folder.load(0)
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_mask, mask)
    assert got_mask.dtype == np.int64


def test_class_count_is_inferred_and_ignore_pixels_allowed(tmp_path):
    _, mask = _pair(tmp_path, "a", classes=4)
    mask[0, :] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    folder = scan_folder(tmp_path)
    assert folder.num_classes == int(mask[mask != 255].max()) + 1


def test_every_problem_is_listed_in_one_error(tmp_path):
    _pair(tmp_path, "good")
    _pair(tmp_path, "orphan_image")
    (tmp_path / "masks" / "orphan_image.png").unlink()
    _pair(tmp_path, "orphan_mask")
    (tmp_path / "images" / "orphan_mask.png").unlink()
    _pair(tmp_path, "corrupt")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    _pair(tmp_path, "sizes")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "sizes.png")
    _pair(tmp_path, "rgbmask")
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "masks" / "rgbmask.png")
    _pair(tmp_path, "badclass")
    Image.fromarray(np.full((12, 10), 7, np.uint8)).save(tmp_path / "masks" / "badclass.png")

    with pytest.raises(FolderDatasetError) as info:
        scan_folder(tmp_path, num_classes=3)
    message = str(info.value)
    assert "6 problem(s)" in message
    for expected in [
        "orphan_image.png: no mask masks/orphan_image.png",
        "masks/orphan_mask.png: no image with stem 'orphan_mask'",
        "images/corrupt.png: cannot decode",
        "sizes: image is 10x12 but mask is 5x5",
        "masks/rgbmask.png: cannot use (mode RGB is not an index mask",
        "masks/badclass.png: class ids [7] outside 0..2",
        "--skip-bad",
    ]:
        assert expected in message
    assert "good" not in message

    folder = scan_folder(tmp_path, num_classes=3, skip_bad=True)
    assert [p[0].stem for p in folder.pairs] == ["good"]
    assert len(folder.skipped) == 6


def test_missing_subdirectory_and_empty_folder(tmp_path):
    with pytest.raises(FolderDatasetError, match="needs images/ and masks/"):
        scan_folder(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(FolderDatasetError, match="no usable image/mask pairs"):
        scan_folder(tmp_path)


def test_classes_file_must_agree_with_num_classes(tmp_path):
    _pair(tmp_path, "a")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(FolderDatasetError, match="disagrees"):
        scan_folder(tmp_path, num_classes=5)


def test_jpeg_images_pair_with_png_masks(tmp_path):
    _pair(tmp_path, "photo", suffix=".jpg")
    folder = scan_folder(tmp_path)
    assert folder.pairs[0][0].suffix == ".jpg"
    assert folder.load(0)[0].shape == (12, 10, 3)


def test_train_and_val_subfolders_share_the_root_classes_file(tmp_path):
    _pair(tmp_path / "train", "a", size=(20, 30))
    _pair(tmp_path / "train", "b", size=(20, 30), seed=1)
    _pair(tmp_path / "val", "c", seed=2)
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    layout = folder_layout(tmp_path)
    assert (layout.train, layout.val) == (tmp_path / "train", tmp_path / "val")
    assert layout.classes_file == tmp_path / "classes.txt"
    train = scan_folder(layout.train, classes_file=layout.classes_file)
    val = scan_folder(layout.val, classes_file=layout.classes_file)
    assert train.class_names == val.class_names == ("sky", "road", "car")
    assert train.sizes == [(30, 20), (30, 20)]  # (width, height), measured while scanning


def test_layouts_without_a_validation_folder(tmp_path):
    flat = tmp_path / "flat"
    _pair(flat, "a")
    assert folder_layout(flat) == FolderLayout(flat, flat, None, None)
    only_train = tmp_path / "only_train"
    _pair(only_train / "train", "a")
    (only_train / "train" / "classes.txt").write_text("x\ny\nz\n")
    layout = folder_layout(only_train)
    assert layout.val is None and layout.classes_file == only_train / "train" / "classes.txt"
    with pytest.raises(FolderDatasetError, match="is not a directory"):
        folder_layout(tmp_path / "missing")


def test_stray_large_class_id_is_warned_about(tmp_path, capsys):
    _pair(tmp_path, "a", classes=5)
    _, mask = _pair(tmp_path, "b", classes=5, seed=1)
    mask = mask.astype(np.uint16)
    mask[0, 0] = 300
    Image.fromarray(mask).save(tmp_path / "masks" / "b.png")
    folder = scan_folder(tmp_path)
    assert folder.num_classes == 301  # still what the masks say; the warning explains
    err = capsys.readouterr().err
    assert "warning:" in err and "300 (in masks/b.png)" in err
    assert "301 classes" in err and "classes.txt" in err


def test_dense_class_ids_give_no_warning(tmp_path, capsys):
    _pair(tmp_path, "a", classes=5)
    assert scan_folder(tmp_path).num_classes == 5
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(5)))
    scan_folder(tmp_path)
    assert "warning" not in capsys.readouterr().err
