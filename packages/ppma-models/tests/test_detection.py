"""Mask R-CNN on a PPMA backbone: sizes, the mmdetection geometry it corrects, forward passes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from ppma_models import CheckpointError, load_model, read_metadata, save_safetensors
from ppma_models.detection import (
    DETECTION_MODELS,
    AlignedMultiScaleRoIAlign,
    DetectionSettings,
    PPMAMaskRCNN,
    UnroundedAnchorGenerator,
    count_parameters,
    create_detection_model,
    separable_roi_align,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

# A detector small enough for a CPU test: 3-stage nano backbone, narrow heads, 64 px images.
SMALL = dict(
    min_size=64,
    max_size=64,
    fpn_channels=16,
    box_head_width=32,
    mask_head_convs=1,
    mask_head_channels=8,
    rpn_pre_nms_top_n_test=50,
    rpn_post_nms_top_n_test=20,
    box_batch_size_per_image=32,
)
NANO3 = dict(dims=(16, 32, 64), depths=(1, 1, 1), heads=(2, 2, 4), mlp_ratios=(2, 2, 2),
             attention_kinds=("X", "X", "V"), layer_scale=(False,) * 3)  # fmt: skip


def small_model(num_classes: int = 3, **overrides) -> PPMAMaskRCNN:
    torch.manual_seed(0)
    return create_detection_model(
        "ppma_nano", num_classes, backbone_args=NANO3, **{**SMALL, **overrides}
    )


@pytest.mark.parametrize(
    ("name", "paper_millions"),
    [("mask_rcnn_ppma_tiny", 33), ("mask_rcnn_ppma_small", 46), ("mask_rcnn_ppma_base", 73)],
)
def test_parameter_counts_match_the_paper(name, paper_millions):
    with torch.device("meta"):
        model = create_detection_model(name, 80)
    assert round(count_parameters(model) / 1e6) == paper_millions
    assert model.backbone.body.config.dims[-1] == 512
    assert name in DETECTION_MODELS


def test_defaults_are_mmdetection_mask_rcnn_1x():
    with torch.device("meta"):
        model = create_detection_model("mask_rcnn_ppma_tiny", 80)
    rpn, heads = model.rpn, model.roi_heads
    sizes = [s[0] for s in model.rpn.anchor_generator.sizes]
    assert sizes == [32, 64, 128, 256, 512]
    assert model.rpn.anchor_generator.aspect_ratios[0] == (0.5, 1.0, 2.0)
    assert rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert (rpn.nms_thresh, rpn.fg_bg_sampler.batch_size_per_image) == (0.7, 256)
    assert heads.fg_bg_sampler.batch_size_per_image == 512
    assert heads.fg_bg_sampler.positive_fraction == 0.25
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    assert heads.box_roi_pool.output_size == (7, 7) and heads.mask_roi_pool.output_size == (14, 14)
    assert heads.box_head.fc6.out_features == heads.box_head.fc7.out_features == 1024
    assert len(heads.mask_head) == 4
    assert model.backbone.out_channels == 256 and model.backbone.strides == [4, 8, 16, 32, 64]
    assert (model.transform.min_size, model.transform.max_size) == ((800,), 1333)


def _mmdet_anchors(stride, size, ratios, grid_h, grid_w):
    """mmdetection's formula, written out: base anchors centred at 0 (no rounding), shifted to
    every cell's top-left corner; locations row-major, ratios inner."""
    out = []
    for y in range(grid_h):
        for x in range(grid_w):
            for r in ratios:
                h_ratio = math.sqrt(r)
                w, h = size / h_ratio, size * h_ratio
                cx, cy = x * stride, y * stride
                out.append([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h])
    return torch.tensor(out)


def test_anchors_are_mmdetections_unrounded_anchors():
    ratios = (0.5, 1.0, 2.0)
    gen = UnroundedAnchorGenerator(((32.0,), (64.0,)), (ratios, ratios))
    images = ImageList(torch.zeros(1, 3, 32, 48), [(32, 48)])
    feats = [torch.zeros(1, 1, 8, 12), torch.zeros(1, 1, 4, 6)]
    anchors = gen(images, feats)[0]
    expected = torch.cat(
        [_mmdet_anchors(4, 32, ratios, 8, 12), _mmdet_anchors(8, 64, ratios, 4, 6)]
    )
    torch.testing.assert_close(anchors, expected.float())
    # torchvision's own generator rounds: the corrected corners are where they differ.
    rounded = AnchorGenerator(((32,), (64,)), (ratios, ratios))(images, feats)[0]
    assert (rounded - anchors).abs().max() > 0.2
    assert torch.equal(rounded, UnroundedAnchorGenerator(
        ((32,), (64,)), (ratios, ratios), round_corners=True)(images, feats)[0])  # fmt: skip


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_samples_pixel_centres_when_aligned(aligned):
    """Features equal to their column index, so a bilinear sample returns its x position and a
    bin's pooled value is the mean x of its samples: the bin centre, shifted by half a pixel
    when aligned (mmdetection), not shifted otherwise (torchvision's MultiScaleRoIAlign)."""
    feats = {
        "0": torch.arange(16.0).expand(1, 1, 16, 16),  # stride 4 of a 64 px image
        "1": (torch.arange(8.0) + 1000).expand(1, 1, 8, 8),  # stride 8
    }
    pool = AlignedMultiScaleRoIAlign(["0", "1"], 2, 2, aligned=aligned)
    box = torch.tensor([[8.0, 8.0, 40.0, 24.0]])  # √area 22.6 px: the finest level
    out = pool(feats, [box], [(64, 64)])
    x1, x2 = 8.0 / 4, 40.0 / 4
    shift = 0.5 if aligned else 0.0
    centres = torch.tensor([x1 + (j + 0.5) * (x2 - x1) / 2 - shift for j in range(2)])
    torch.testing.assert_close(out[0, 0], centres.expand(2, 2))


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_separable_roi_align_equals_torchvisions_kernel(aligned, sampling_ratio):
    """Values and feature gradients, for boxes inside, across and beyond the map's border,
    tiny and large (adaptive sample counts from 1 to 6)."""
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(3, 5, 12, 10, dtype=torch.float64, generator=g, requires_grad=True)
    corners = torch.rand(40, 2, dtype=torch.float64, generator=g) * 60 - 8
    sides = torch.rand(40, 2, dtype=torch.float64, generator=g) * 45 + 0.1
    image = torch.arange(40, dtype=torch.float64).div(14).floor()[:, None]  # sorted: 0, 1, 2
    rois = torch.cat([image, corners, corners + sides], dim=1)
    args = (7, 0.25, sampling_ratio, aligned)
    ours, theirs = separable_roi_align(feature, rois, *args), roi_align(feature, rois, *args)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, feature, grad)
    (their_grad,) = torch.autograd.grad(theirs, feature, grad)
    torch.testing.assert_close(ours_grad, their_grad)


def test_roi_align_assigns_large_boxes_to_coarse_levels():
    """Level ⌊log2(side / 56)⌋ from the finest, clamped: sides 50, 120, 230, 460, 900 px go
    to levels 0, 1, 2, 3, 3 (constant maps whose value is the level)."""
    feats = {str(l): torch.full((1, 1, 256 >> l, 256 >> l), float(l)) for l in range(4)}
    pool = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 1, 1)
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in (50.0, 120.0, 230.0, 460.0, 900.0)])
    out = pool(feats, [boxes], [(1024, 1024)])
    assert out.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 3.0]


def test_backbone_maps_are_layer_normed_per_stage():
    model = small_model()
    body = model.backbone.body
    x = torch.randn(2, 3, 64, 64)
    raw = body.forward_intermediates(x, intermediates_only=True)
    for i, (normed, plain) in enumerate(zip(body(x), raw, strict=True)):
        norm = body.out_norms[str(i)]
        expected = F.layer_norm(plain.permute(0, 2, 3, 1), (plain.shape[1],), norm.weight,
                                norm.bias, norm.eps).permute(0, 3, 1, 2)  # fmt: skip
        torch.testing.assert_close(normed, expected)
    pyramid = model.backbone(x)
    assert list(pyramid) == ["0", "1", "2", "pool"]
    assert [tuple(m.shape[-2:]) for m in pyramid.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def _targets(n_images: int = 2):
    targets = []
    for i in range(n_images):
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        masks[0, 10:40, 12:30] = 1
        masks[1, 30 + i : 60, 35:60] = 1
        boxes = torch.tensor([[12.0, 10.0, 30.0, 40.0], [35.0, 30.0 + i, 60.0, 60.0]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks})
    return targets


def test_training_losses_and_inference_outputs():
    model = small_model().train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    losses = model(images, _targets())
    expected = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
    assert expected | {"loss_rpn_box_reg"} == set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.stem.conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64), torch.rand(3, 48, 80)])
    assert out[1]["masks"].shape[1:] == (1, 48, 80)
    for det in out:
        assert det["boxes"].shape == (len(det["labels"]), 4)
        assert all(1 <= label <= 3 for label in det["labels"].tolist())


def test_state_dict_is_in_the_default_layout_for_any_safetensors_writer(tmp_path):
    from safetensors.torch import save_file

    model = small_model()
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    save_file(state, tmp_path / "plain.safetensors")  # refuses non-contiguous tensors


def test_pipeline_sized_training_keeps_the_image_size():
    model = small_model(train_resize=False).train()
    images, targets = model.transform([torch.rand(3, 96, 96)], _targets(1))
    assert images.image_sizes == [(96, 96)]
    fixed = small_model().train()
    images, _ = fixed.transform([torch.rand(3, 96, 96)], _targets(1))
    assert images.image_sizes == [(64, 64)]
    model.eval()
    images, _ = model.transform([torch.rand(3, 96, 96)])
    assert images.image_sizes == [(64, 64)]


def test_settings_are_checked_and_round_trip():
    settings = DetectionSettings(min_size=64, max_size=96, aspect_ratios=(1.0,))
    assert DetectionSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="fpn_channels"):
        DetectionSettings(fpn_channels=0)
    with pytest.raises(ValueError, match="box_nms_thresh"):
        DetectionSettings(box_nms_thresh=1.5)
    with pytest.raises(TypeError, match="unknown DetectionSettings field"):
        settings.replace(anchor_sizes=(32,))
    with pytest.raises(ValueError, match="unknown detection model or backbone"):
        create_detection_model("mask_rcnn_resnet50", 80)
    with pytest.raises(ValueError, match="num_classes"):
        small_model(num_classes=0)


def _metadata(path) -> dict[str, str]:
    """Every metadata entry of a safetensors file, ppma_models' own included."""
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _forged(path, tmp_path, name: str, **changes: str):
    """A copy of the safetensors file ``path`` with metadata entries replaced."""
    save_file(load_file(path), str(tmp_path / name), metadata={**_metadata(path), **changes})
    return tmp_path / name


def test_safetensors_rebuild_the_detector_from_the_file_alone(tmp_path):
    model = small_model(anchor_scale=5.0).eval()
    path = tmp_path / "det.safetensors"
    save_safetensors(model, path, class_names=["a", "b", "c"], metadata={"app": "{}"})
    loaded = load_model(path).eval()
    assert isinstance(loaded, PPMAMaskRCNN) and loaded.settings == model.settings
    assert loaded.class_names == ["a", "b", "c"] and loaded.num_classes == 3
    assert read_metadata(path)["app"] == "{}"
    assert loaded.backbone_config == model.backbone_config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        expected, got = model(images)[0], loaded(images)[0]
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_forged_detector_metadata_is_refused_before_building(tmp_path):
    path = tmp_path / "det.safetensors"
    save_safetensors(small_model(), path)
    settings = json.loads(_metadata(path)["detection_head"])
    huge = _forged(path, tmp_path, "huge.safetensors",
                   detection_head=json.dumps({**settings, "fpn_channels": 1 << 20}))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"huge.safetensors.*fpn_channels <= 65536"):
        load_model(huge)
    unknown = _forged(path, tmp_path, "unknown.safetensors",
                      detection_head=json.dumps({**settings, "anchor_sizes": [32]}))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"unknown.safetensors.*anchor_sizes"):
        load_model(unknown)
    wider = _forged(path, tmp_path, "wider.safetensors",
                    detection_head=json.dumps({**settings, "fpn_channels": 24}))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"wider.safetensors: the tensors do not match"):
        load_model(wider)
    both = _forged(path, tmp_path, "both.safetensors", segmentation_head="{}")
    with pytest.raises(CheckpointError, match="two heads"):
        load_model(both)
