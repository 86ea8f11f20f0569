"""mmdetection-layout detector checkpoints: conversion, loading, and what is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ppma_models import create_model, get_config, save_upstream
from ppma_models.checkpoint import CheckpointError
from ppma_models.convert import convert_to_upstream
from ppma_models.detection import create_detection_model
from ppma_models.detection_convert import (
    CLASS_LAYERS,
    convert_from_mmdet,
    convert_to_mmdet,
    is_mmdet_state_dict,
    load_detection_checkpoint,
    save_mmdet,
)
from ppma_models.model import PPMA

NANO3 = dict(dims=(16, 32, 64), depths=(1, 1, 1), heads=(2, 2, 4), mlp_ratios=(2, 2, 2),
             attention_kinds=("X", "X", "V"), layer_scale=(False,) * 3)  # fmt: skip
FPN, WIDTH, MASK, CONVS = 16, 32, 8, 2
HEADS = dict(fpn_channels=FPN, box_head_width=WIDTH, mask_head_channels=MASK, mask_head_convs=CONVS)
SMALL = dict(min_size=64, max_size=64, rpn_post_nms_top_n_test=30, **HEADS)


def detector(num_classes: int = 4, **overrides):
    torch.manual_seed(1)
    return create_detection_model(
        "ppma_nano", num_classes, backbone_args=NANO3, **{**SMALL, **overrides}
    )


def mmdet_layout(classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An mmdetection Mask R-CNN state dict written from mmdetection's module names: FPN neck
    (ConvModule ``.conv``), RPNHead, Shared2FCBBoxHead (background is the last class row,
    class-specific box deltas without one) and FCNMaskHead (deconv upsample)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    config = get_config("ppma_nano").replace(**NANO3)
    body = PPMA(config, features_only=True, out_indices=(0, 1, 2))
    state = {f"backbone.{k}": v for k, v in convert_to_upstream(body.state_dict()).items()}
    for i, c in enumerate(NANO3["dims"]):
        state |= {f"neck.lateral_convs.{i}.conv.weight": t(FPN, c, 1, 1)}
        state |= {f"neck.lateral_convs.{i}.conv.bias": t(FPN)}
        state |= {f"neck.fpn_convs.{i}.conv.weight": t(FPN, FPN, 3, 3)}
        state |= {f"neck.fpn_convs.{i}.conv.bias": t(FPN)}
    state |= {"rpn_head.rpn_conv.weight": t(FPN, FPN, 3, 3), "rpn_head.rpn_conv.bias": t(FPN)}
    state |= {"rpn_head.rpn_cls.weight": t(3, FPN, 1, 1), "rpn_head.rpn_cls.bias": t(3)}
    state |= {"rpn_head.rpn_reg.weight": t(12, FPN, 1, 1), "rpn_head.rpn_reg.bias": t(12)}
    box = "roi_head.bbox_head."
    state |= {f"{box}shared_fcs.0.weight": t(WIDTH, FPN * 49), f"{box}shared_fcs.0.bias": t(WIDTH)}
    state |= {f"{box}shared_fcs.1.weight": t(WIDTH, WIDTH), f"{box}shared_fcs.1.bias": t(WIDTH)}
    state |= {f"{box}fc_cls.weight": t(classes + 1, WIDTH), f"{box}fc_cls.bias": t(classes + 1)}
    state |= {f"{box}fc_reg.weight": t(4 * classes, WIDTH), f"{box}fc_reg.bias": t(4 * classes)}
    mask = "roi_head.mask_head."
    for i in range(CONVS):
        state |= {f"{mask}convs.{i}.conv.weight": t(MASK, FPN if i == 0 else MASK, 3, 3)}
        state |= {f"{mask}convs.{i}.conv.bias": t(MASK)}
    state |= {f"{mask}upsample.weight": t(MASK, MASK, 2, 2), f"{mask}upsample.bias": t(MASK)}
    state |= {f"{mask}conv_logits.weight": t(classes, MASK, 1, 1)}
    state |= {f"{mask}conv_logits.bias": t(classes)}
    return state


@pytest.fixture
def mmdet_file(tmp_path):
    state = mmdet_layout(4)
    path = tmp_path / "mask_rcnn_ppma.pth"
    meta = {"CLASSES": ("cat", "dog", "cow", "owl"), "mmdet_version": "2.25.0"}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {}}, path)
    return path, state


def test_every_mmdetection_tensor_is_loaded(mmdet_file):
    path, state = mmdet_file
    model = detector()
    result = load_detection_checkpoint(model, path)
    assert (result.kind, result.missing, result.unexpected) == ("mmdetection", [], [])
    assert result.class_names == ["cat", "dog", "cow", "owl"]
    own = model.state_dict()
    # The backbone as the library's own dense-checkpoint loader reads it from the same file.
    body = create_model(
        "ppma_nano", features_only=True, out_indices=(0, 1, 2), pretrained=path, **NANO3
    )
    for key, value in body.state_dict().items():
        assert torch.equal(own[f"backbone.body.{key}"], value), key
    fpn = own["backbone.fpn.layer_blocks.2.0.weight"]
    assert torch.equal(fpn, state["neck.fpn_convs.2.conv.weight"])
    assert torch.equal(own["rpn.head.bbox_pred.bias"], state["rpn_head.rpn_reg.bias"])


def test_class_layers_compute_what_mmdetection_computes(mmdet_file):
    """Same RoI features in, same class probabilities, per-class box deltas and mask logits
    out, with mmdetection's class k (background last) as our label k + 1 (background 0)."""
    path, state = mmdet_file
    model = detector()
    load_detection_checkpoint(model, path)
    z = torch.randn(5, WIDTH)
    box = "roi_head.bbox_head."
    theirs = F.softmax(F.linear(z, state[f"{box}fc_cls.weight"], state[f"{box}fc_cls.bias"]), 1)
    ours = F.softmax(model.roi_heads.box_predictor.cls_score(z), 1)
    torch.testing.assert_close(ours[:, 0], theirs[:, -1])
    torch.testing.assert_close(ours[:, 1:], theirs[:, :-1])
    deltas = F.linear(z, state[f"{box}fc_reg.weight"], state[f"{box}fc_reg.bias"])
    torch.testing.assert_close(model.roi_heads.box_predictor.bbox_pred(z)[:, 4:], deltas)
    m = torch.randn(2, MASK, 28, 28)
    w, b = (
        state["roi_head.mask_head.conv_logits.weight"],
        state["roi_head.mask_head.conv_logits.bias"],
    )
    logits = model.roi_heads.mask_predictor.mask_fcn_logits(m)
    torch.testing.assert_close(logits[:, 1:], F.conv2d(m, w, b))


def test_mmdetection_layout_round_trips_exactly(mmdet_file, tmp_path):
    _, state = mmdet_file
    converted, unknown = convert_from_mmdet(state)
    assert unknown == [] and is_mmdet_state_dict(state) and not is_mmdet_state_dict(converted)
    back = convert_to_mmdet(converted)
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    # ... and through a file written from the model
    model = detector()
    load_detection_checkpoint(model, mmdet_file[0])
    save_mmdet(model, tmp_path / "again.pth", class_names=["a", "b", "c", "d"])
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again["meta"]["CLASSES"] == ("a", "b", "c", "d")
    assert all(torch.equal(again["state_dict"][k], v) for k, v in state.items())


def test_class_agnostic_heads_are_repeated_per_class():
    state = mmdet_layout(3)
    state["roi_head.bbox_head.fc_reg.weight"] = state["roi_head.bbox_head.fc_reg.weight"][:4]
    state["roi_head.bbox_head.fc_reg.bias"] = state["roi_head.bbox_head.fc_reg.bias"][:4]
    converted, _ = convert_from_mmdet(state)
    reg = converted["roi_heads.box_predictor.bbox_pred.weight"]
    assert reg.shape[0] == 16
    for k in range(1, 4):
        assert torch.equal(reg[4 * k : 4 * k + 4], state["roi_head.bbox_head.fc_reg.weight"])


def test_another_class_count_keeps_fresh_class_layers(mmdet_file):
    model = detector(num_classes=7)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k in CLASS_LAYERS}
    result = load_detection_checkpoint(model, mmdet_file[0])
    assert sorted(result.kept_init) == sorted(CLASS_LAYERS)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in fresh.items())
    assert torch.equal(own["rpn.head.cls_logits.weight"], mmdet_file[1]["rpn_head.rpn_cls.weight"])


def test_our_layout_and_backbone_checkpoints_load(tmp_path):
    source = detector()
    torch.save(source.state_dict(), tmp_path / "ours.pt")
    model = detector()
    assert load_detection_checkpoint(model, tmp_path / "ours.pt").kind == "detector"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    # An ImageNet-style classifier (the authors' layout) initialises the backbone only.
    torch.manual_seed(5)
    classifier = create_model("ppma_nano", num_classes=10, **NANO3)
    save_upstream(classifier, tmp_path / "classifier.pth")
    model = detector(pretrained=str(tmp_path / "classifier.pth"))
    own = model.backbone.body.state_dict()
    for key, value in classifier.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(own[key], value), key


def test_foreign_checkpoints_fail_clearly(tmp_path, mmdet_file):
    resnet = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}
    resnet |= {"backbone.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    resnet |= {k: v for k, v in mmdet_file[1].items() if not k.startswith("backbone.")}
    torch.save({"state_dict": resnet}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="resnet.pth: its backbone is not a PPMA backbone"):
        load_detection_checkpoint(detector(), tmp_path / "resnet.pth")
    torchvision_keys = {
        "backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
        "rpn.head.conv.0.0.weight": torch.zeros(256, 256, 3, 3),
    }
    torch.save(torchvision_keys, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="tv.pth: its backbone is not a PPMA backbone"):
        load_detection_checkpoint(detector(), tmp_path / "tv.pth")
    extra = dict(mmdet_file[1])
    extra["roi_head.mask_iou_head.fc_mask_iou.weight"] = torch.zeros(4, 8)
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"outside mmdetection's Mask R-CNN.*mask_iou_head"):
        load_detection_checkpoint(detector(), tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"wide.pth does not fit.*shape\(s\) differ"):
        torch.save({"state_dict": mmdet_file[1]}, tmp_path / "wide.pth")
        load_detection_checkpoint(detector(fpn_channels=24), tmp_path / "wide.pth")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pth"):
        load_detection_checkpoint(detector(), tmp_path / "evil.pth")
    assert "never run" not in capsys.readouterr().out
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_detection_checkpoint(detector(), tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_detection_checkpoint(detector(), tmp_path / "missing.pth")
