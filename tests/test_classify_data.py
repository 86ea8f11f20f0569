"""Fashion-MNIST IDX reader: real files, hand-written IDX files and malformed ones."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from apps.data.fashion_mnist import (
    DEFAULT_ROOT,
    FASHION_MNIST_CLASSES,
    FashionMNISTError,
    load_fashion_mnist,
)


def _write_idx(path: Path, array: np.ndarray, *, gz: bool = True, magic: bytes | None = None):
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    header += b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _make_split(root: Path, prefix: str, n: int, *, gz: bool = True) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
    return images, labels


@pytest.mark.fashion_mnist
def test_real_files_have_expected_shapes_and_balanced_classes():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int64
    # The official test split has exactly 1,000 images per class.
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10
    assert DEFAULT_ROOT.is_dir()


@pytest.mark.parametrize("gz", [True, False])
def test_user_directory_round_trips_bytes(tmp_path, gz):
    images, labels = _make_split(tmp_path, "t10k", 7, gz=gz)
    got_images, got_labels = load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels.astype(np.int64))


def test_missing_directory_names_the_package(tmp_path):
    with pytest.raises(FashionMNISTError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nope")


def test_missing_file_is_reported(tmp_path):
    _make_split(tmp_path, "t10k", 3)
    with pytest.raises(FashionMNISTError, match="train-images-idx3-ubyte"):
        load_fashion_mnist("train", tmp_path)


def test_bad_magic_truncation_and_count_mismatch(tmp_path):
    images, labels = _make_split(tmp_path, "train", 5)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, magic=b"\x00\x00\x0d\x03")
    with pytest.raises(FashionMNISTError, match="magic"):
        load_fashion_mnist("train", tmp_path)
    # Header says 5 images but only 4 images' bytes follow.
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytes([0, 0, 8, 3]) + struct.pack(">III", 5, 28, 28) + images[:4].tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(FashionMNISTError, match="truncated"):
        load_fashion_mnist("train", tmp_path)
    _write_idx(path, images[:4])
    with pytest.raises(FashionMNISTError, match="4 images but 5 labels"):
        load_fashion_mnist("train", tmp_path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(FashionMNISTError, match="cannot read"):
        load_fashion_mnist("train", tmp_path)


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_empty_class_folders_are_named_in_a_warning(tmp_path, capsys):
    from PIL import Image

    from apps.classify.datasets import scan_image_folder

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name / "a.png")
    (tmp_path / "bird").mkdir()
    (tmp_path / "fish").mkdir()
    (tmp_path / "fish" / "notes.txt").write_text("no images here")
    samples, names = scan_image_folder(tmp_path)
    assert names == ["bird", "cat", "dog", "fish"] and len(samples) == 2
    err = capsys.readouterr().err
    assert "2 class folder(s) without images ['bird', 'fish']" in err
    scan_image_folder(tmp_path / "cat" / "..", ["bird", "cat", "dog", "fish"])
    assert "bird" in capsys.readouterr().err


def test_no_warning_when_every_class_has_images(tmp_path, capsys):
    from PIL import Image

    from apps.classify.datasets import scan_image_folder

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name / "a.png")
    scan_image_folder(tmp_path)
    assert "warning" not in capsys.readouterr().err
