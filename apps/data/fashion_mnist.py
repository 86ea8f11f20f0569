"""Fashion-MNIST from the gzipped IDX files (Debian package ``dataset-fashion-mnist``).

The IDX format (LeCun's MNIST format) is a big-endian header -- two zero bytes, a type code
(0x08 = unsigned byte) and the number of dimensions -- followed by one uint32 per dimension and
the raw data. Files may be gzipped (``*.gz``) or plain.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_ROOT", "FASHION_MNIST_CLASSES", "FashionMNISTError", "load_fashion_mnist"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# split -> file prefix; expected sizes guard against a truncated or swapped download.
_PREFIX = {"train": "train", "test": "t10k"}
_EXPECTED_COUNT = {"train": 60_000, "test": 10_000}
_UBYTE = 0x08


class FashionMNISTError(ValueError):
    """The Fashion-MNIST files are missing or malformed (message says which and why)."""


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        path = root / name
        if path.is_file():
            return path
    raise FashionMNISTError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the dataset with "
        "`apt-get install dataset-fashion-mnist` or pass --data-dir pointing to a directory "
        "with the four IDX files (train-images-idx3-ubyte.gz, ...)."
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise FashionMNISTError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise FashionMNISTError(
            f"{path} is not an IDX file of {ndim}-D unsigned bytes "
            f"(magic {raw[:4].hex() if len(raw) >= 4 else 'missing'}, "
            f"expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FashionMNISTError(f"{path} is truncated inside its header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise FashionMNISTError(
            f"{path}: header promises shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of Fashion-MNIST.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000; ``"t10k"`` is accepted too).
        root: directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
            default: the Debian package's ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``(images, labels)``: uint8 array (n, 28, 28) and int64 array (n,) with values 0..9
        (names in :data:`FASHION_MNIST_CLASSES`).

    Raises:
        FashionMNISTError: missing directory/files, bad magic numbers, truncated data,
            image/label count mismatch.
        ValueError: unknown split.
    """
    if split == "t10k":
        split = "test"
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = DEFAULT_ROOT if root is None else Path(root)
    if not root.is_dir():
        raise FashionMNISTError(
            f"Fashion-MNIST directory {root} does not exist. Install the dataset with "
            "`apt-get install dataset-fashion-mnist` or pass --data-dir pointing to a directory "
            "with the IDX files."
        )
    prefix = _PREFIX[split]
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), ndim=3)
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise FashionMNISTError(
            f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in split {split!r}"
        )
    if images.shape[1:] != (28, 28):
        raise FashionMNISTError(f"{root}: images have shape {images.shape[1:]}, expected (28, 28)")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise FashionMNISTError(f"{root}: label {int(labels.max())} out of range 0..9")
    if root == DEFAULT_ROOT and images.shape[0] != _EXPECTED_COUNT[split]:
        raise FashionMNISTError(
            f"{root}: split {split!r} has {images.shape[0]} images, expected "
            f"{_EXPECTED_COUNT[split]}; reinstall dataset-fashion-mnist"
        )
    return images, labels.astype(np.int64)
