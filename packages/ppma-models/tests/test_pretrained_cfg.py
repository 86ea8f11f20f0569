"""Pretrained settings in the registry: the published values, defaults, checks, and the
authors' model names that load_model recognises through them."""

from __future__ import annotations

import json

import pytest
import torch
from ppma_models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainedCfg,
    get_pretrained_cfg,
    load_model,
    register_model,
)
from ppma_models.registry import model_for_upstream_name
from ppma_models.testing import TINY_CONFIG, seeded_model, write_authors_checkpoint

AUTHORS = "https://github.com/zhongchenzhao/PPMA"


@pytest.mark.parametrize(
    ("name", "upstream"),
    [("ppma_tiny", "PPMAViT_T"), ("ppma_small", "PPMAViT_S"), ("ppma_base", "PPMAViT_B")],
)
def test_published_models_carry_the_authors_settings(name, upstream):
    cfg = get_pretrained_cfg(name)
    # The authors' evaluation: Resize(256, bicubic) + CenterCrop(224), ImageNet statistics.
    assert cfg.input_size == (3, 224, 224)
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    assert cfg.crop_pct == 224 / 256 and cfg.interpolation == "bicubic"
    assert cfg.num_classes == 1000
    assert cfg.license == "Apache-2.0" and cfg.url == AUTHORS
    assert cfg.upstream_names == (upstream,) and cfg.published
    assert model_for_upstream_name(upstream) == name
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON values
    assert PretrainedCfg(**data) == cfg


def test_the_imagenet_statistics_are_defined_once():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)
    assert get_pretrained_cfg("ppma_tiny").mean is IMAGENET_MEAN


def test_unpublished_models_get_defaults_for_their_channels():
    nano = get_pretrained_cfg("ppma_nano")
    assert not nano.published and nano.url == "" and nano.license == ""
    assert nano.input_size == (3, 224, 224) and nano.mean == IMAGENET_MEAN
    grey = TINY_CONFIG.replace(in_chans=1)
    register_model("test_pretrained_grey", grey, overwrite=True)
    cfg = get_pretrained_cfg("test_pretrained_grey")
    assert cfg.input_size == (1, 224, 224)
    assert cfg.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    assert cfg.std == pytest.approx((sum(IMAGENET_STD) / 3,))
    with pytest.raises(ValueError, match="unknown model 'ppma_huge'"):
        get_pretrained_cfg("ppma_huge")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input_size": (3, 224)}, "input_size must be"),
        ({"input_size": (1, 224, 224)}, r"mean needs one entry per input channel \(1\)"),
        ({"std": (0.2, 0.0, 0.2)}, "std entries must be positive"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
        ({"interpolation": "lanczos"}, "interpolation must be one of"),
        ({"num_classes": -1}, "num_classes must be >= 0"),
    ],
)
def test_bad_pretrained_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        PretrainedCfg(**fields)


def test_register_model_checks_its_pretrained_settings():
    with pytest.raises(ValueError, match="3 channels but the config has in_chans=1"):
        register_model("test_bad_channels", TINY_CONFIG.replace(in_chans=1),
                       pretrained_cfg=PretrainedCfg(), overwrite=True)  # fmt: skip
    with pytest.raises(ValueError, match="'PPMAViT_T' already belongs to model 'ppma_tiny'"):
        register_model("test_thief", TINY_CONFIG,
                       pretrained_cfg=PretrainedCfg(upstream_names=("PPMAViT_T",)))  # fmt: skip
    with pytest.raises(TypeError, match="pretrained_cfg must be a PretrainedCfg"):
        register_model("test_dict_cfg", TINY_CONFIG, pretrained_cfg={"num_classes": 3})


def test_load_model_recognises_upstream_names_from_the_registry(tmp_path):
    cfg = PretrainedCfg(num_classes=4, upstream_names=("PPMAViT_test_tiny",))
    register_model("test_upstream_tiny", TINY_CONFIG, pretrained_cfg=cfg, overwrite=True)
    source = seeded_model("test_upstream_tiny", num_classes=4).eval()
    path = write_authors_checkpoint(
        tmp_path / "best.pth", source, upstream_name="PPMAViT_test_tiny"
    )
    loaded = load_model(path).eval()
    assert loaded.name == "test_upstream_tiny" and loaded.config == TINY_CONFIG
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
