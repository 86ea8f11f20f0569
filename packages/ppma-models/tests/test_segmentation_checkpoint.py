"""Segmentation models in our safetensors format: round trips, the application's metadata,
and damaged or hostile head settings refused with one error naming the file."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from ppma_models import (
    PPMA,
    CheckpointError,
    SegmentationModel,
    UPerHead,
    create_segmentation_model,
    load_checkpoint,
    load_model,
    read_metadata,
    save_safetensors,
    save_upstream,
)
from ppma_models.checkpoint import RESERVED_METADATA
from ppma_models.checkpoint import metadata as ckpt_metadata
from ppma_models.segmentation import FCNHead
from ppma_models.testing import TINY_CONFIG, rewrite_safetensors, safetensors_contents
from safetensors.torch import save_file
from torch import nn

CLASSES = ["sky", "road", "tree"]
# Non-default settings everywhere, so that each one must really be recorded.
SETTINGS = dict(channels=8, aux_channels=4, aux_in_index=1, pool_scales=(1, 3), dropout=0.2,
                fuse_kernel_size=1)  # fmt: skip


def _segmenter(seed: int = 0, **settings: object) -> SegmentationModel:
    torch.manual_seed(seed)
    backbone = PPMA(TINY_CONFIG, features_only=True, name="tiny")
    model = create_segmentation_model(backbone, len(CLASSES), **{**SETTINGS, **settings})
    with torch.no_grad():  # non-trivial statistics, so that buffers must travel too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> tuple[Path, SegmentationModel]:
    model = _segmenter()
    path = tmp_path_factory.mktemp("seg") / "seg.safetensors"
    save_safetensors(model, path, class_names=CLASSES, metadata={"epoch": "7"})
    return path, model


def _head(good: Path, **changes: object) -> str:
    data = json.loads(safetensors_contents(good)[1]["segmentation_head"])
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v != "drop"})


# ------------------------------------------------------------------------------ round trips
def test_round_trip_rebuilds_the_segmentation_model(good_file):
    path, model = good_file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt = load_model(path).eval()
    assert isinstance(rebuilt, SegmentationModel) and isinstance(rebuilt.backbone, PPMA)
    assert rebuilt.backbone.config == TINY_CONFIG and rebuilt.backbone.name == "tiny"
    assert rebuilt.class_names == CLASSES and rebuilt.num_classes == 3
    assert rebuilt.head_settings() == {**SETTINGS, "pool_scales": [1, 3]}
    assert rebuilt.decode_head.dropout.p == rebuilt.auxiliary_head.dropout.p == 0.2
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        logits, aux = rebuilt(x, return_aux=True)
        expected, expected_aux = model(x, return_aux=True)
    assert logits.shape == (2, 3, 37, 29)
    assert torch.equal(logits, expected) and torch.equal(aux, expected_aux)


def test_round_trip_without_auxiliary_head(tmp_path):
    model = _segmenter(seed=1, aux_channels=None)
    path = tmp_path / "noaux.safetensors"
    save_safetensors(model, path)
    rebuilt = load_model(path).eval()
    assert rebuilt.auxiliary_head is None and not hasattr(rebuilt, "class_names")
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_load_checkpoint_fills_a_built_segmentation_model(tmp_path, good_file):
    path, model = good_file
    fresh = _segmenter(seed=5)
    result = load_checkpoint(fresh, path)
    assert result.kind == "safetensors" and result.missing == result.unexpected == []
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    authors = tmp_path / "backbone.pth"
    save_upstream(PPMA(TINY_CONFIG, num_classes=3), authors)
    with pytest.raises(CheckpointError, match=r"load_checkpoint\(model\.backbone, path\)"):
        load_checkpoint(fresh, authors)
    load_checkpoint(fresh.backbone, authors)  # the backbone alone takes the authors' file


# --------------------------------------------------------------------- application metadata
def test_application_metadata_round_trips_beside_the_reserved_keys(tmp_path, good_file):
    path, _ = good_file
    assert read_metadata(path) == {"epoch": "7"}
    classifier = PPMA(TINY_CONFIG, num_classes=2)
    mine = tmp_path / "cls.safetensors"
    app = {"classify": json.dumps({"input_size": [32, 32]}), "note": "ünïcode ✓", "empty": ""}
    save_safetensors(classifier, mine, metadata=app)
    assert read_metadata(mine) == app
    save_safetensors(classifier, mine)
    assert read_metadata(mine) == {}
    for key in RESERVED_METADATA:
        with pytest.raises(ValueError, match=rf"metadata key '{key}' is reserved"):
            save_safetensors(classifier, tmp_path / "x.safetensors", metadata={key: "1"})
    foreign = tmp_path / "foreign.safetensors"  # another library's file: its entries, ours out
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt", "source": "x"})
    assert read_metadata(foreign) == {"source": "x"}


def test_read_metadata_refuses_other_files_naming_them(tmp_path):
    pth = tmp_path / "weights.pth"
    save_upstream(PPMA(TINY_CONFIG, num_classes=2), pth)
    with pytest.raises(CheckpointError, match=rf"{re.escape(repr(str(pth)))} is not a safetensors"):
        read_metadata(pth)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_metadata(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match=re.escape(str(text))):
        read_metadata(text)


# ---------------------------------------------------------------- what cannot be described
def test_save_refuses_models_its_settings_would_not_rebuild(tmp_path):
    model = _segmenter()
    twice = FCNHead(16, len(CLASSES), channels=4, in_index=1, num_convs=2, dropout=0.2)
    odd = SegmentationModel(model.backbone, model.decode_head, twice)
    with pytest.raises(ValueError, match="several convs or its own dropout"):
        save_safetensors(odd, tmp_path / "odd.safetensors")
    wider = UPerHead([8, 16], len(CLASSES), channels=8, pool_scales=(1, 3), dropout=0.2,
                     fuse_kernel_size=1)  # fmt: skip
    wider.lateral_convs[0] = nn.Sequential(nn.Conv2d(8, 8, 3, bias=False))  # not a ConvModule
    with pytest.raises(ValueError, match="not what its recorded settings rebuild"):
        save_safetensors(SegmentationModel(model.backbone, wider), tmp_path / "w.safetensors")
    toy = SegmentationModel(nn.Identity(), model.decode_head)
    with pytest.raises(TypeError, match="PPMA backbone only"):
        save_safetensors(toy, tmp_path / "toy.safetensors")
    with pytest.raises(ValueError, match="class_names has 2 entries but the model has 3"):
        save_safetensors(model, tmp_path / "n.safetensors", class_names=["a", "b"])
    assert not list(tmp_path.iterdir())  # nothing half-written


# -------------------------------------------------------------------------- hostile metadata
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"segmentation_head": "{"}, r"metadata 'segmentation_head' is not valid JSON"),
        ({"segmentation_head": "[8]"}, r"segmentation_head is not usable: expected a JSON obj"),
        ({"segmentation_head": {"dropout": "drop"}}, r"missing field\(s\) \['dropout'\]"),
        ({"segmentation_head": {"width": 8}}, r"unknown field\(s\) \['width'\]"),
        ({"segmentation_head": {"channels": "8"}}, r"channels must be an integer, got '8'"),
        ({"segmentation_head": {"channels": True}}, r"channels must be an integer, got True"),
        ({"segmentation_head": {"aux_channels": 1.5}}, r"aux_channels must be an integer or null"),
        ({"segmentation_head": {"pool_scales": [1, "3"]}}, r"pool_scales must be a list of int"),
        ({"segmentation_head": {"dropout": float("nan")}}, r"dropout must be a number"),
        ({"segmentation_head": {"channels": 0}}, r"outside the limits \(1 <= channels <= 65536"),
        ({"segmentation_head": {"channels": 1 << 20}}, r"outside the limits \(1 <= channels"),
        ({"segmentation_head": {"aux_in_index": 2}}, r"aux_in_index names one of the backbone's 2"),
        ({"segmentation_head": {"pool_scales": []}}, r"1 to 16 pool_scales, each 1 to 256"),
        ({"segmentation_head": {"pool_scales": [1, 100000]}}, r"1 to 16 pool_scales"),
        ({"segmentation_head": {"dropout": 1.0}}, r"0 <= dropout < 1"),
        ({"segmentation_head": {"fuse_kernel_size": 2}}, r"odd fuse_kernel_size <= 15"),
        ({"segmentation_head": {"fuse_kernel_size": 99}}, r"odd fuse_kernel_size <= 15"),
        ({"features_only": "false"}, r"needs a features_only backbone and num_classes >= 1"),
        ({"num_classes": "0"}, r"needs a features_only backbone and num_classes >= 1"),
        ({"num_classes": "4"}, r"3 class names for 4 classes"),
        ({"out_indices": "[1]"}, r"aux_in_index names one of the backbone's 1 maps"),
        ({"segmentation_head": {"channels": 16}}, r"shape\(s\) differ: decode_head\."),
        ({"segmentation_head": {"aux_channels": None}}, r"unexpected tensor\(s\): auxiliary_h"),
        ({"segmentation_head": {"pool_scales": [1, 2, 3]}}, r"tensor\(s\) missing: decode_hea"),
    ],
)
def test_bad_segmentation_metadata_is_one_error_naming_the_file(
    tmp_path, good_file, change, message
):
    good, _ = good_file
    change = {
        k: _head(good, **v) if isinstance(v, dict) else v for k, v in change.items()
    }  # {"segmentation_head": {...}} changes fields of the good settings
    path = rewrite_safetensors(good, tmp_path / "bad.safetensors", **change)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(path)
    assert str(path) in str(caught.value)


def test_huge_head_in_metadata_is_refused_before_allocating(tmp_path, good_file, monkeypatch):
    good, _ = good_file
    # Within the limits, but ~100 GB of float32 if the metadata were trusted.
    path = rewrite_safetensors(good, tmp_path / "huge.safetensors",
                    segmentation_head=_head(good, channels=60000, fuse_kernel_size=3))  # fmt: skip
    real = ckpt_metadata.create_segmentation_model
    devices = []

    def guarded(*args: object, **kwargs: object) -> SegmentationModel:
        devices.append(torch.get_default_device().type)
        if devices[-1] != "meta":
            raise AssertionError("the head described by the metadata was allocated")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_metadata, "create_segmentation_model", guarded)
    pattern = (
        rf"{re.escape(str(path))}: .*shape\(s\) differ: "
        r"decode_head\.conv_seg\.weight is \(3, 8, 1, 1\) in the file, \(3, 60000, 1, 1\) by"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_model(path)
    assert devices == ["meta"]
