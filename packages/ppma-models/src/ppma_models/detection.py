"""Mask R-CNN + FPN on a PPMA backbone, built from torchvision's detection models.

    >>> from ppma_models.detection import create_detection_model
    >>> model = create_detection_model("mask_rcnn_ppma_tiny", num_classes=80).eval()
    >>> out = model([torch.rand(3, 480, 640)])   # list of {"boxes", "labels", "scores", "masks"}

The pieces (docs/design.md §4.3):

* :class:`PPMAFeaturePyramid` -- the PPMA dense backbone (``features_only=True``): every stage
  output goes through its own LayerNorm (``out_norms.i``, the authors' ``outnorm{i}``), then
  torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` makes ``fpn_channels``-wide maps
  at strides 4, 8, 16, 32 and a fifth, max-pooled level at stride 64.
* torchvision's :class:`~torchvision.models.detection.MaskRCNN`: RPN, RoIAlign 7×7 for boxes and
  14×14 for masks, two fully connected layers, a four-conv mask head.
* :class:`DetectionSettings` -- every knob torchvision exposes, with the values of
  mmdetection's ``mask_rcnn_r50_fpn`` 1× schedule as defaults (anchors 8 × stride, i.e. 32-512,
  ratios 0.5/1/2; 2000/1000 proposals before/after NMS in training, 1000/1000 in testing; 256
  anchors and 512 RoIs sampled per image; score threshold 0.05, NMS 0.5, 100 detections).

Two of torchvision's defaults differ from mmdetection's and are corrected here, so that the
authors' converted checkpoints see the geometry they were trained with:

* RoIAlign: mmdetection samples with ``aligned=True`` (a pixel's centre is at +0.5) and an
  adaptive sampling ratio; torchvision's ``MultiScaleRoIAlign`` uses ``aligned=False`` and 2
  samples. :class:`AlignedMultiScaleRoIAlign` pools with ``aligned`` and ``sampling_ratio``
  from the settings.
* Anchors: torchvision rounds the anchor corners to integers, mmdetection does not (a 0.5-ratio
  anchor of size 32 is 45.25 × 22.63 there, 46 × 22 in torchvision).
  :class:`UnroundedAnchorGenerator` keeps them exact.

Labels follow torchvision: ``num_classes`` counts the object classes, predictions use labels
1..num_classes and 0 is the background. The converter in :mod:`ppma_models.detection_convert`
moves mmdetection's background (its last class index) accordingly.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .config import PPMAConfig
from .model import PPMA

__all__ = [
    "DETECTION_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SEPARABLE_MAX_CELLS",
    "AlignedMultiScaleRoIAlign",
    "DetectionSettings",
    "PPMAFeaturePyramid",
    "PPMAMaskRCNN",
    "UnroundedAnchorGenerator",
    "count_parameters",
    "create_detection_model",
    "separable_roi_align",
]

#: Detection model name → the registered backbone it is built on.
DETECTION_MODELS: dict[str, str] = {
    "mask_rcnn_ppma_tiny": "ppma_tiny",
    "mask_rcnn_ppma_small": "ppma_small",
    "mask_rcnn_ppma_base": "ppma_base",
}

# The normalisation of the ImageNet-pretrained backbones (mmdetection's img_norm_cfg / 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectionSettings:
    """Everything besides the backbone that fixes a detector's shapes and behaviour.

    Defaults: mmdetection's ``mask_rcnn_r50_fpn`` 1× (see the module docstring). Sizes are in
    pixels of the resized input. ``anchor_scale`` × the stride of each pyramid level is that
    level's anchor size (mmdetection's ``octave_base_scale``). ``train_resize=False`` leaves the
    training images at the size the data pipeline gave them (mmdetection resizes in its data
    pipeline, which is where scale jitter happens); inference always resizes to
    ``min_size``/``max_size`` and maps the detections back to the input image.
    """

    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 32
    train_resize: bool = True
    fpn_channels: int = 256
    anchor_scale: float = 8.0
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    round_anchors: bool = False
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    roi_aligned: bool = True
    roi_sampling_ratio: int = 0  # 0: adaptive, ceil(RoI size / output size) samples per bin
    box_head_width: int = 1024
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    mask_head_convs: int = 4
    mask_head_channels: int = 256

    def __post_init__(self) -> None:
        positive = [
            "min_size", "max_size", "size_divisible", "fpn_channels", "rpn_pre_nms_top_n_train",
            "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
            "rpn_batch_size_per_image", "box_head_width", "box_detections_per_img",
            "box_batch_size_per_image", "mask_head_convs", "mask_head_channels",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DetectionSettings.{name} must be an integer >= 1, got {value!r}")
        fractions = [
            "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "rpn_positive_fraction",
            "box_score_thresh", "box_nms_thresh", "box_fg_iou_thresh", "box_bg_iou_thresh",
            "box_positive_fraction",
        ]  # fmt: skip
        for name in fractions:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"DetectionSettings.{name} must be in [0, 1], got {value!r}")
        for name in ("train_resize", "round_anchors", "roi_aligned"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"DetectionSettings.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} must be >= min_size {self.min_size}")
        if not self.aspect_ratios or any(not r > 0 for r in self.aspect_ratios):
            raise ValueError(f"aspect_ratios must be positive, got {self.aspect_ratios!r}")
        if not (isinstance(self.anchor_scale, int | float) and self.anchor_scale > 0):
            raise ValueError(f"anchor_scale must be > 0, got {self.anchor_scale!r}")
        if not isinstance(self.roi_sampling_ratio, int) or self.roi_sampling_ratio < 0:
            raise ValueError(f"roi_sampling_ratio must be >= 0, got {self.roi_sampling_ratio!r}")

    def replace(self, **changes: Any) -> DetectionSettings:
        """A copy with some fields changed (sequences stored as tuples)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown DetectionSettings field(s) {unknown}; known: {sorted(known)}")
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        items = dataclasses.asdict(self).items()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in items}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectionSettings:
        return cls().replace(**dict(data))


class UnroundedAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator with mmdetection's exact (unrounded) anchor corners.

    Each level gets one size and all ``aspect_ratios`` (height / width), centred on the top-left
    corner of each feature-map cell, in the same order as mmdetection's and torchvision's.
    """

    def __init__(self, sizes, aspect_ratios, round_corners: bool = False) -> None:
        self.round_corners = round_corners
        super().__init__(sizes, aspect_ratios)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None):
        anchors = super().generate_anchors(scales, aspect_ratios, dtype, device or "cpu")
        if self.round_corners:
            return anchors
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h = ratios.sqrt()
        ws = ((1 / h)[:, None] * scales[None, :]).reshape(-1)
        hs = (h[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


#: Feature maps up to this many cells are pooled by :func:`separable_roi_align` on the CPU.
SEPARABLE_MAX_CELLS = 64 * 64


def _axis_weights(
    start: torch.Tensor, size: torch.Tensor, out: int, count: torch.Tensor, length: int
) -> torch.Tensor:
    """(R, out, length) weights along one axis: bin i of RoI r is the mean of ``count[r]``
    bilinear samples, with RoIAlign's border rules (a sample more than one cell outside
    contributes nothing; one within a cell of the border is clamped onto it)."""
    k = torch.arange(max(int(count.max()), 1) if len(count) else 1, device=start.device)
    bin_size = size / out
    i = torch.arange(out, dtype=start.dtype, device=start.device)
    p = start[:, None, None] + bin_size[:, None, None] * (
        i[None, :, None] + (k[None, None, :] + 0.5) / count[:, None, None]
    )
    valid = (k < count[:, None, None]) & (p >= -1.0) & (p <= length)
    p = p.clamp(min=0)
    low = p.floor().clamp(max=length - 1)
    frac = torch.where(p >= length - 1, torch.zeros_like(p), p - low)
    low = low.long()
    high = (low + 1).clamp(max=length - 1)
    weights = start.new_zeros(len(start), out, length)
    weights.scatter_add_(2, low.flatten(2), ((1 - frac) * valid).flatten(2))
    weights.scatter_add_(2, high.flatten(2), (frac * valid).flatten(2))
    return weights / count[:, None, None]


def separable_roi_align(
    feature: torch.Tensor,
    rois: torch.Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """:func:`torchvision.ops.roi_align` as matrix products; equal to it up to rounding.

    A RoIAlign bin averages bilinear samples on a grid, and bilinear weights (with RoIAlign's
    border rules) factor into a row and a column weight, so bin (i, j) of RoI r is
    ``Σ_y Σ_x W_y[r, i, y] F[c, y, x] W_x[r, j, x]``: two GEMMs per image. On small CPU
    feature maps this is several times faster than torchvision's kernel, whose backward pass
    scatters every sample into the map one at a time.

    feature: (B, C, H, W); rois: (R, 5) rows (image index, x1, y1, x2, y2) sorted by image
    index → (R, C, output_size, output_size).
    """
    n, channels, height, width = feature.shape
    offset = 0.5 if aligned else 0.0
    # Coordinates at least in float32 (bf16 features under autocast would blur them).
    r = rois.to(torch.promote_types(feature.dtype, torch.float32))
    x1, y1 = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    w, h = r[:, 3] * spatial_scale - offset - x1, r[:, 4] * spatial_scale - offset - y1
    if not aligned:  # torchvision's legacy rule: RoIs are at least one cell wide
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    if sampling_ratio > 0:
        count_w = count_h = torch.full_like(w, float(sampling_ratio))
    else:
        count_w = torch.ceil(w / output_size).clamp(min=1)
        count_h = torch.ceil(h / output_size).clamp(min=1)
    weights_x = _axis_weights(x1, w, output_size, count_w, width)
    weights_y = _axis_weights(y1, h, output_size, count_h, height)
    weights_x, weights_y = weights_x.to(feature.dtype), weights_y.to(feature.dtype)
    rows = feature.permute(0, 2, 1, 3).reshape(n, height, channels * width)
    counts = torch.bincount(rois[:, 0].long(), minlength=n).tolist()
    parts = []
    for b, (wy, wx) in enumerate(
        zip(weights_y.split(counts), weights_x.split(counts), strict=True)
    ):
        m = len(wy)
        if m == 0:
            continue
        t = wy.reshape(m * output_size, height) @ rows[b]  # (m·out_i, C·W)
        t = torch.bmm(t.view(m, output_size * channels, width), wx.transpose(1, 2))
        parts.append(t.view(m, output_size, channels, output_size).permute(0, 2, 1, 3))
    if not parts:
        return feature.new_zeros(0, channels, output_size, output_size)
    return torch.cat(parts).contiguous()


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """:class:`~torchvision.ops.MultiScaleRoIAlign` with a choice of pixel alignment.

    Boxes go to pyramid levels as in torchvision and mmdetection alike: level
    ⌊log2(√area / 56)⌋ counted from the stride-4 map, clamped to the levels present.
    ``aligned=True`` samples the feature map at pixel centres, as mmdetection's RoIAlign does;
    torchvision's class always uses False. Small CPU maps (at most
    :data:`SEPARABLE_MAX_CELLS` cells) are pooled by :func:`separable_roi_align`, others by
    torchvision's kernel; both compute the same values.

    forward(features: {name: (B, C, H_l, W_l)}, boxes: list of (n_i, 4) xyxy in input pixels,
    image_shapes: list of (h, w)) → (Σ n_i, C, output_size, output_size).
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int,
        sampling_ratio: int,
        *,
        aligned: bool = True,
    ) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.aligned = aligned

    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        size, ratio = self.output_size[0], self.sampling_ratio
        cells = feature.shape[-2] * feature.shape[-1]
        square = self.output_size[0] == self.output_size[1]
        if feature.device.type == "cpu" and cells <= SEPARABLE_MAX_CELLS and square:
            return separable_roi_align(feature, rois, size, scale, ratio, self.aligned)
        return roi_align(feature, rois, self.output_size, scale, ratio, self.aligned)

    def forward(self, x, boxes, image_shapes):
        features = [v for k, v in x.items() if k in self.featmap_names]
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)]
        )
        height = max(h for h, _ in image_shapes)
        # Each level's scale is a power of two: the feature map's size over the input's, rounded.
        scales = [2.0 ** round(math.log2(f.shape[-2] / height)) for f in features]
        finest = -round(math.log2(scales[0]))  # 2 for stride 4
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        level = torch.floor(4 + torch.log2(area.clamp(min=0).sqrt() / 224) + 1e-6)
        level = level.clamp(finest, finest + len(features) - 1).to(torch.int64) - finest
        used = torch.unique(level).tolist()
        if len(used) == 1:  # every box on one level (typical of small images): no scatter
            return self._pool(features[used[0]], rois, scales[used[0]])
        out = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for i in used:
            index = torch.where(level == i)[0]
            out[index] = self._pool(features[i], rois[index], scales[i]).to(out.dtype)
        return out


class PPMAFeaturePyramid(nn.Module):
    """PPMA stage outputs (each LayerNorm-ed) → FPN maps, finest first, plus a pooled level.

    body: a ``features_only`` :class:`~ppma_models.model.PPMA` (its ``out_norms`` are the
    per-stage LayerNorms of the authors' detection backbone). forward: (B, 3, H, W) →
    OrderedDict {"0": stride 4, "1": stride 8, ..., "pool": twice the coarsest stride}, each
    (B, out_channels, ⌈H/stride⌉, ⌈W/stride⌉).
    """

    def __init__(self, body: PPMA, out_channels: int = 256) -> None:
        super().__init__()
        if not isinstance(body, PPMA) or not body.features_only:
            raise TypeError("body must be a PPMA built with features_only=True")
        expected = tuple(range(body.config.num_stages))
        if body.out_indices != expected:
            raise ValueError(f"body must return every stage {expected}, got {body.out_indices}")
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_channels(), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    @property
    def strides(self) -> list[int]:
        """Stride of each output level ("0", "1", ..., "pool")."""
        strides = [self.body.config.strides[i] for i in self.body.out_indices]
        return [*strides, strides[-1] * 2]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class PipelineSizedTransform(GeneralizedRCNNTransform):
    """torchvision's normalise / resize / batch step, optionally without the training resize.

    With ``train_resize=False`` the images keep the size the data pipeline gave them while the
    model trains (the pipeline's scale jitter would otherwise be undone); in eval mode they are
    resized to ``min_size`` / ``max_size`` as usual.
    """

    def __init__(self, *args: Any, train_resize: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_resize = train_resize

    def resize(self, image, target=None):
        if self.training and not self.train_resize:
            return image, target
        return super().resize(image, target)


class PPMAMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN on :class:`PPMAFeaturePyramid`, set up by ``settings``.

    Training: ``model(images, targets)`` with images a list of (3, H, W) floats in [0, 1] and
    targets a list of {"boxes": (n, 4) xyxy, "labels": (n,) int64 in 1..num_classes,
    "masks": (n, H, W) uint8} → dict of losses. Inference (eval mode): ``model(images)`` → per
    image {"boxes", "labels", "scores", "masks": (n, 1, H, W) probabilities}.
    """

    def __init__(
        self,
        body: PPMA,
        num_classes: int,
        settings: DetectionSettings | None = None,
        *,
        name: str | None = None,
    ) -> None:
        settings = settings or DetectionSettings()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        backbone = PPMAFeaturePyramid(body, settings.fpn_channels)
        s, c = settings, settings.fpn_channels
        anchors = UnroundedAnchorGenerator(
            tuple((s.anchor_scale * stride,) for stride in backbone.strides),
            (tuple(s.aspect_ratios),) * len(backbone.strides),
            round_corners=s.round_anchors,
        )
        names = [str(i) for i in range(len(backbone.strides) - 1)]
        pool = {
            size: AlignedMultiScaleRoIAlign(
                names, size, s.roi_sampling_ratio, aligned=s.roi_aligned
            )
            for size in (7, 14)
        }
        mask_layers = [s.mask_head_channels] * s.mask_head_convs
        super().__init__(
            backbone,
            num_classes=None,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(c, len(s.aspect_ratios)),
            rpn_pre_nms_top_n_train=s.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=s.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=s.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=s.rpn_post_nms_top_n_test,
            rpn_nms_thresh=s.rpn_nms_thresh,
            rpn_fg_iou_thresh=s.rpn_fg_iou_thresh,
            rpn_bg_iou_thresh=s.rpn_bg_iou_thresh,
            rpn_batch_size_per_image=s.rpn_batch_size_per_image,
            rpn_positive_fraction=s.rpn_positive_fraction,
            box_roi_pool=pool[7],
            box_head=TwoMLPHead(c * 7 * 7, s.box_head_width),
            box_predictor=FastRCNNPredictor(s.box_head_width, num_classes + 1),
            box_score_thresh=s.box_score_thresh,
            box_nms_thresh=s.box_nms_thresh,
            box_detections_per_img=s.box_detections_per_img,
            box_fg_iou_thresh=s.box_fg_iou_thresh,
            box_bg_iou_thresh=s.box_bg_iou_thresh,
            box_batch_size_per_image=s.box_batch_size_per_image,
            box_positive_fraction=s.box_positive_fraction,
            mask_roi_pool=pool[14],
            mask_head=MaskRCNNHeads(c, mask_layers, 1),
            mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes + 1),
        )
        self.transform = PipelineSizedTransform(
            s.min_size,
            s.max_size,
            list(IMAGENET_MEAN),
            list(IMAGENET_STD),
            size_divisible=s.size_divisible,
            train_resize=s.train_resize,
        )
        self.settings = settings
        self.num_classes = num_classes
        self.name = name
        _init_like_mmdetection(self)
        # The mask head's convolutions are most of a small detector's training step; oneDNN
        # runs them faster on channels-last maps (a memory layout: same values). The maps are
        # converted, not the weights, so the state dict stays in the default layout that any
        # safetensors writer accepts.
        self.roi_heads.mask_head.register_forward_pre_hook(_channels_last_input)

    @property
    def backbone_config(self) -> PPMAConfig:
        return self.backbone.body.config


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the module's first input as a channels-last map."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _init_like_mmdetection(model: PPMAMaskRCNN) -> None:
    """mmdetection's initialisation where torchvision's differs: Xavier-uniform FPN convs and
    shared FCs, N(0, 0.01) class scores and N(0, 0.001) box deltas (so training starts from
    near-uniform class probabilities and near-zero box corrections)."""
    for module in (*model.backbone.fpn.modules(), *model.roi_heads.box_head.modules()):
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    predictor = model.roi_heads.box_predictor
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


def _backbone(name_or_config: str | PPMAConfig, overrides: Mapping[str, Any]) -> tuple[PPMA, str]:
    """The features-mode PPMA for a detection name, a backbone name or a config."""
    from .registry import get_config, list_models

    if isinstance(name_or_config, PPMAConfig):
        config, name = name_or_config, None
    elif isinstance(name_or_config, str):
        backbone = DETECTION_MODELS.get(name_or_config, name_or_config)
        if backbone not in list_models():
            raise ValueError(
                f"unknown detection model or backbone {name_or_config!r}; detection models: "
                f"{sorted(DETECTION_MODELS)}, backbones: {list_models()}"
            )
        config, name = get_config(backbone), name_or_config
    else:
        raise TypeError(
            f"name_or_config must be a model name or a PPMAConfig, got {type(name_or_config)}"
        )
    if overrides:
        config = config.replace(**overrides)
    stages = tuple(range(config.num_stages))
    body = PPMA(config, features_only=True, out_indices=stages, name=name)
    return body, name or "mask_rcnn_ppma"


def create_detection_model(
    name_or_config: str | PPMAConfig,
    num_classes: int = 80,
    *,
    pretrained: str | Path | None = None,
    drop_path_rate: float | None = None,
    backbone_args: Mapping[str, Any] | None = None,
    settings: DetectionSettings | None = None,
    **setting_overrides: Any,
) -> PPMAMaskRCNN:
    """Mask R-CNN + FPN on a PPMA backbone.

    name_or_config: ``mask_rcnn_ppma_tiny`` / ``_small`` / ``_base`` (see
        :data:`DETECTION_MODELS`), any registered backbone name (``ppma_nano``, ...) or a
        :class:`~ppma_models.config.PPMAConfig`.
    num_classes: object classes, background not counted (80 for COCO).
    pretrained: an authors' mmdetection checkpoint or one of ours (the whole detector), or an
        ImageNet classification checkpoint, theirs or ours (the backbone); see
        :func:`ppma_models.detection_convert.load_detection_checkpoint`.
    drop_path_rate, backbone_args: :class:`PPMAConfig` overrides of the backbone.
    settings / setting_overrides: :class:`DetectionSettings` (default: mmdetection's 1×).
    """
    overrides = dict(backbone_args or {})
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    body, name = _backbone(name_or_config, overrides)
    settings = (settings or DetectionSettings()).replace(**setting_overrides)
    model = PPMAMaskRCNN(body, num_classes, settings, name=name)
    if pretrained is not None:
        from .detection_convert import load_detection_checkpoint

        load_detection_checkpoint(model, pretrained)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (every parameter, trainable or not)."""
    return sum(p.numel() for p in model.parameters())
