"""Joint augmentation keeps image and mask aligned; normalisation round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.segment.transforms import TrainAugment, denormalize, to_tensors


def _labelled_image(h=20, w=24, seed=0):
    """Image whose red channel is 10 × the mask (4×4 blocks): alignment checkable per pixel."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 5, (h // 4, w // 4)), np.ones((4, 4), np.int64))
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 10 * mask
    return image, mask


def _red_level(x):
    return torch.round(denormalize(x)[..., 0].float() / 10).long()


@pytest.mark.parametrize("seed", range(6))
def test_crop_flip_and_pad_move_image_and_mask_together(seed):
    image, mask = _labelled_image()
    x, y = to_tensors(image, mask)
    augment = TrainAugment(crop=28, scale_range=(1.0, 1.0), ignore_index=255)
    xa, ya = augment(x, y, torch.Generator().manual_seed(seed))
    assert xa.shape == (3, 28, 28) and ya.shape == (28, 28)
    labelled = ya != 255
    assert labelled.sum() == 20 * 24  # the crop is larger than the image: all of it is kept
    assert torch.equal(_red_level(xa)[labelled], ya[labelled])
    assert torch.equal(xa[:, ~labelled], torch.zeros_like(xa[:, ~labelled]))


def test_rescale_keeps_alignment_inside_regions():
    image, mask = _labelled_image()
    x, y = to_tensors(image, mask)
    augment = TrainAugment(crop=40, scale_range=(2.0, 2.0), flip=False)
    xa, ya = augment(x, y, torch.Generator().manual_seed(0))
    assert ya.shape == (40, 40)
    # Away from label boundaries bilinear and nearest resampling agree.
    padded = torch.nn.functional.pad(ya[None, None].float(), (1, 1, 1, 1), mode="replicate")
    interior = (
        torch.nn.functional.max_pool2d(padded, 3, 1)
        == -torch.nn.functional.max_pool2d(-padded, 3, 1)
    )[0, 0]
    assert interior.sum() > 100
    assert torch.equal(_red_level(xa)[interior], ya[interior])


def test_same_generator_seed_same_sample():
    image, mask = _labelled_image()
    x, y = to_tensors(image, mask)
    augment = TrainAugment(crop=16)
    a = augment(x, y, torch.Generator().manual_seed(5))
    b = augment(x, y, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_grey_images_become_three_channels_and_round_trip():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    x = to_tensors(grey)
    assert x.shape == (3, 3, 4)
    assert torch.equal(denormalize(x)[..., 1], torch.from_numpy(grey))


def test_bad_inputs():
    with pytest.raises(ValueError, match="image must be uint8"):
        to_tensors(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        to_tensors(np.zeros((4, 4), np.uint8), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="scale_range"):
        TrainAugment(crop=8, scale_range=(2.0, 1.0))
