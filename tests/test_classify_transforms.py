"""Preprocessing/augmentation of apps.classify and the --model-arg parser."""

from __future__ import annotations

import pytest
import torch

from apps.classify.datasets import collate_skipping_failed
from apps.classify.transforms import Preprocess
from apps.engine.model_args import parse_model_args
from apps.engine.options import OptionError


def test_eval_preprocess_is_plain_normalisation():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    out = Preprocess((28, 28), (0.5,), (0.25,))(image)
    torch.testing.assert_close(out, (image.float() / 255 - 0.5) / 0.25)


def test_small_train_crop_is_a_shift_of_the_padded_image():
    torch.manual_seed(0)
    image = torch.arange(28 * 28, dtype=torch.float32).view(1, 28, 28) / (28 * 28)
    pre = Preprocess((28, 28), (0.0,), (1.0,), train=True, hflip=False)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    for _ in range(20):
        out = pre(image)
        assert out.shape == (1, 28, 28)
        # Exactly one offset (dy, dx) in [0, 4]^2 reproduces the crop.
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[:, dy : dy + 28, dx : dx + 28], out)
        ]
        assert len(hits) == 1


def test_flip_happens_only_when_allowed():
    torch.manual_seed(1)
    image = torch.rand(1, 8, 8)
    flips = Preprocess((8, 8), (0.0,), (1.0,), train=True, hflip=True, crop=True)
    outs = [flips(image) for _ in range(40)]
    # With pad 1 a flipped crop is a crop of the flipped image.
    padded_flip = torch.nn.functional.pad(image.flip(-1), (1, 1, 1, 1))
    flipped = sum(
        any(
            torch.equal(padded_flip[:, dy : dy + 8, dx : dx + 8], o)
            for dy in range(3)
            for dx in range(3)
        )
        for o in outs
    )
    assert 5 < flipped < 35
    no_flip = Preprocess((8, 8), (0.0,), (1.0,), train=True, hflip=False)
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
    for _ in range(20):
        o = no_flip(image)
        assert any(
            torch.equal(padded[:, dy : dy + 8, dx : dx + 8], o)
            for dy in range(3)
            for dx in range(3)
        )


def test_flips_without_crops_keep_every_pixel_in_place():
    torch.manual_seed(2)
    image = torch.rand(1, 8, 8)
    flip_only = Preprocess((8, 8), (0.0,), (1.0,), train=True, hflip=True, crop=False)
    outs = [flip_only(image) for _ in range(40)]
    flipped = sum(torch.equal(o, image.flip(-1)) for o in outs)
    assert 5 < flipped < 35
    assert sum(torch.equal(o, image) for o in outs) == 40 - flipped
    plain = Preprocess((8, 8), (0.0,), (1.0,), train=True, hflip=False, crop=False)
    assert all(torch.equal(plain(image), image) for _ in range(5))


def test_large_inputs_get_resized_crops_and_centre_crops():
    torch.manual_seed(0)
    photo = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    train = Preprocess((64 + 32, 64 + 32), (0.5,) * 3, (0.25,) * 3, train=True)(photo)
    evaluated = Preprocess((96, 96), (0.5,) * 3, (0.25,) * 3)(photo)
    assert train.shape == evaluated.shape == (3, 96, 96)


def test_channel_adaptation():
    grey = torch.randint(0, 256, (1, 10, 10), dtype=torch.uint8)
    rgb = Preprocess((10, 10), (0.0,) * 3, (1.0,) * 3, channels=3)(grey)
    assert rgb.shape == (3, 10, 10) and torch.equal(rgb[0], rgb[2])
    colour = torch.zeros(3, 10, 10, dtype=torch.uint8)
    colour[1] = 255
    lum = Preprocess((10, 10), (0.0,), (1.0,), channels=1)(colour)
    torch.testing.assert_close(lum, torch.full((1, 10, 10), 0.587))


def test_collate_drops_failed_samples():
    batch = [(torch.zeros(2), torch.tensor(1)), None, (torch.ones(2), torch.tensor(0))]
    x, y = collate_skipping_failed(batch)
    assert x.shape == (2, 2) and y.tolist() == [1, 0]
    assert collate_skipping_failed([None, None]) is None


def test_parse_model_args():
    got = parse_model_args(
        ["dims=8,16", "head_hidden=32", "attention_kinds=X,V", "layer_scale=false,true"]
    )
    assert got == {
        "dims": (8, 16),
        "head_hidden": 32,
        "attention_kinds": ("X", "V"),
        "layer_scale": (False, True),
    }
    with pytest.raises(OptionError, match="KEY=VALUE"):
        parse_model_args(["dims"])
