"""UPerNet-style semantic segmentation on a multi-scale backbone.

A :class:`UPerHead` fuses four feature maps (strides 4, 8, 16, 32): pyramid pooling (PPM) on the
last one, a top-down FPN over all four, then the upsampled levels are concatenated, mixed by a
3×3 conv and classified per pixel. An optional :class:`FCNHead` on stage 3 gives the auxiliary
loss used when training UPerNet. :class:`SegmentationModel` ties a backbone to the heads and
returns logits at the input resolution for any input size.

Module and parameter names follow MMSegmentation's ``UPerHead``/``FCNHead``/``EncoderDecoder``
(``psp_modules``, ``bottleneck``, ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``,
``conv_seg``, ``convs``; every conv block is ``conv`` + ``bn`` + ReLU) so that the authors'
UPerNet checkpoints map onto these modules key by key (only the backbone needs a converter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvModule",
    "FCNHead",
    "PyramidPoolingModule",
    "SegmentationModel",
    "UPerHead",
    "backbone_channels",
    "create_segmentation_model",
]


def _linear_resize_matrix(src: int, dst: int, like: torch.Tensor) -> torch.Tensor:
    """(dst, src) matrix of 1-D linear resizing with align_corners=False: F.interpolate's
    weights, read off by resizing the identity (column i is the resized unit vector e_i)."""
    eye = torch.eye(src, dtype=like.dtype, device=like.device).unsqueeze(0)
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0].T


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps to ``size``, align_corners=False (as in the UPerNet
    configs the published checkpoints were trained with).

    Bilinear resizing is separable, so it is computed as R_h · x · R_wᵀ with the 1-D matrices:
    the same weights as F.interpolate up to float rounding, but GEMMs instead of a gather loop,
    whose backward dominated small-model training steps on the CPU. The second GEMM is batched
    over the maps so that it writes the output in place, without a transpose of the (largest)
    full-resolution tensor.
    """
    (h, w), (out_h, out_w) = x.shape[-2:], tuple(size)
    if (h, w) == (out_h, out_w):
        return x
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    lead = x.shape[:-2]
    if w != out_w:  # (…·h, w) @ (w, W): one GEMM over all rows
        x = x.reshape(-1, w) @ _linear_resize_matrix(w, out_w, x).T
    if h != out_h:  # (H, h) @ each (h, W) map: one batched GEMM
        x = torch.matmul(_linear_resize_matrix(h, out_h, x), x.reshape(-1, h, out_w))
    return x.reshape(*lead, out_h, out_w)


class ConvModule(nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d → ReLU; submodules named ``conv``, ``bn``, ``activate``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)


class PyramidPoolingModule(nn.ModuleList):
    """Average-pool the map to each ``pool_scales`` grid, 1×1 conv block, upsample back.

    Entry ``i`` is ``Sequential(AdaptiveAvgPool2d(scale_i), ConvModule(in, channels, 1))``, the
    layout of MMSegmentation's PPM. forward: (B, in, H, W) → list of (B, channels, H, W).
    """

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1))
            for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(branch(x), x.shape[-2:]) for branch in self]


class _DecodeHead(nn.Module):
    """What every head shares: dropout then a 1×1 classifier named ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.channels = channels
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


def _check_features(features: Sequence[torch.Tensor], in_channels: Sequence[int]) -> None:
    if len(features) != len(in_channels):
        raise ValueError(
            f"features: expected {len(in_channels)} maps, got {len(features)} "
            "(the backbone must return one map per entry of in_channels)"
        )
    for i, (f, c) in enumerate(zip(features, in_channels, strict=True)):
        if f.dim() != 4 or f.shape[1] != c:
            raise ValueError(f"features[{i}]: expected shape (B, {c}, H, W), got {tuple(f.shape)}")


class UPerHead(_DecodeHead):
    """PPM on the last map + FPN over all maps, fused and classified.

    in_channels: channels of the input maps, finest first (strides 4, 8, 16, 32 for a PPMA
    backbone). forward: list of (B, in_channels[i], H_i, W_i) → (B, num_classes, H_0, W_0).

    fuse_kernel_size: kernel of ``fpn_bottleneck``, the conv over the concatenated levels at the
    finest resolution. UPerNet's is 3 (what the published checkpoints hold); in a small head it
    is most of the multiply-adds, and 1 leaves the spatial mixing to ``fpn_convs``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        fuse_kernel_size: int = 3,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) < 2:
            raise ValueError(f"in_channels needs at least two levels, got {in_channels}")
        if fuse_kernel_size < 1 or fuse_kernel_size % 2 == 0:
            raise ValueError(f"fuse_kernel_size must be odd and >= 1, got {fuse_kernel_size}")
        self.in_channels = in_channels
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = PyramidPoolingModule(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(
            in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1
        )
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = ConvModule(
            len(in_channels) * channels,
            channels,
            fuse_kernel_size,
            padding=fuse_kernel_size // 2,
        )

    def fuse(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused (B, channels, H_0, W_0) map before dropout and classifier."""
        _check_features(features, self.in_channels)
        top = features[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=False)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        # Top-down pathway: each level receives the upsampled coarser level.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals, strict=False)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.fuse(features))


class FCNHead(_DecodeHead):
    """Auxiliary head: ``num_convs`` 3×3 conv blocks on one backbone map, then the classifier.

    in_index picks the map from the backbone's list (2 = stage 3 for UPerNet's auxiliary loss).
    forward: list of maps → (B, num_classes, H_i, W_i) of map ``in_index``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        in_index: int = 2,
        num_convs: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        self.in_channels = int(in_channels)
        self.in_index = in_index
        self.convs = nn.Sequential(
            *(
                ConvModule(self.in_channels if i == 0 else channels, channels, 3, padding=1)
                for i in range(num_convs)
            )
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[self.in_index]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"features[{self.in_index}]: expected shape (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        return self.classify(self.convs(x))


class SegmentationModel(nn.Module):
    """Backbone + decode head (+ optional auxiliary head) → per-pixel class logits.

    backbone: module mapping (B, 3, H, W) to a list of NCHW maps (finest first).
    forward(x) → logits (B, num_classes, H, W) at the input resolution, any H and W;
    forward(x, return_aux=True) → (logits, aux_logits or None), both at the input resolution,
    for the auxiliary loss while training (pass it through DDP's forward).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: UPerHead,
        auxiliary_head: FCNHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def head_settings(self) -> dict[str, object]:
        """The :func:`create_segmentation_model` arguments that rebuild these heads on the
        same backbone: channels, aux_channels, aux_in_index, pool_scales, dropout,
        fuse_kernel_size (JSON-ready values).

        Raises ValueError for heads that function does not build (another head class, an
        auxiliary head with several convs or a dropout of its own).
        """
        head, aux = self.decode_head, self.auxiliary_head
        if type(head) is not UPerHead or (aux is not None and type(aux) is not FCNHead):
            raise ValueError("head_settings: the heads are not an UPerHead (+ FCNHead)")
        if aux is not None and (len(aux.convs) != 1 or aux.dropout.p != head.dropout.p):
            raise ValueError(
                "head_settings: the auxiliary head has several convs or its own dropout, "
                "which create_segmentation_model does not build"
            )
        return {
            "channels": head.channels,
            "aux_channels": None if aux is None else aux.channels,
            "aux_in_index": 2 if aux is None else aux.in_index,
            "pool_scales": list(head.pool_scales),
            "dropout": head.dropout.p,
            "fuse_kernel_size": head.fpn_bottleneck.conv.kernel_size[0],
        }

    def forward(
        self, x: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if x.dim() != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
        features = list(self.backbone(x))
        size = x.shape[-2:]
        logits = _resize(self.decode_head(features), size)
        if not return_aux:
            return logits
        aux = None
        if self.auxiliary_head is not None:
            aux = _resize(self.auxiliary_head(features), size)
        return logits, aux


def backbone_channels(backbone: nn.Module, in_chans: int = 3) -> list[int]:
    """Channel count of each map a backbone returns.

    Read from ``feature_info`` (timm style: an object with ``channels()``, or a per-stage list
    of dicts with ``num_chs`` together with ``out_indices``), ``out_channels`` or
    ``embed_dims`` when the backbone declares them; otherwise measured with one small forward pass.
    """
    info = getattr(backbone, "feature_info", None)
    if info is not None and callable(getattr(info, "channels", None)):
        return [int(c) for c in info.channels()]
    indices = getattr(backbone, "out_indices", None)
    if isinstance(info, Sequence) and indices is not None and all("num_chs" in i for i in info):
        # timm-style list of per-stage dicts; the backbone returns the ``out_indices`` stages.
        return [int(info[i]["num_chs"]) for i in indices]
    for name in ("out_channels", "embed_dims"):
        value = getattr(backbone, name, None)
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [int(c) for c in value]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            param = next(backbone.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            maps = backbone(torch.zeros(1, in_chans, 64, 64, device=device))
    finally:
        backbone.train(was_training)
    return [int(m.shape[1]) for m in maps]


def create_segmentation_model(
    backbone: str | nn.Module,
    num_classes: int,
    *,
    channels: int = 512,
    aux_channels: int | None = 256,
    aux_in_index: int = 2,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    dropout: float = 0.1,
    fuse_kernel_size: int = 3,
    **backbone_kwargs: object,
) -> SegmentationModel:
    """UPerNet on a backbone given by registry name (``"ppma_tiny"``, ...) or as a module.

    A name is built with ``ppma_models.create_model(name, features_only=True, **backbone_kwargs)``.
    aux_channels=None leaves out the auxiliary FCN head on map ``aux_in_index``;
    ``fuse_kernel_size`` is :class:`UPerHead`'s.
    """
    if isinstance(backbone, str):
        from . import create_model  # the registry lives in the package root

        backbone = create_model(backbone, features_only=True, **backbone_kwargs)
    elif backbone_kwargs:
        raise TypeError(
            f"backbone_kwargs {sorted(backbone_kwargs)} only apply when backbone is a name"
        )
    in_channels = backbone_channels(backbone)
    decode_head = UPerHead(
        in_channels, num_classes, channels, pool_scales, dropout, fuse_kernel_size
    )
    aux = None
    if aux_channels is not None:
        aux = FCNHead(
            in_channels[aux_in_index], num_classes, aux_channels, aux_in_index, 1, dropout
        )
    return SegmentationModel(backbone, decode_head, aux)
