"""UPerNet head and segmentation model: shapes, checkpoint layout, a functional oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ppma_models.segmentation import (
    FCNHead,
    SegmentationModel,
    UPerHead,
    _resize,
    backbone_channels,
    create_segmentation_model,
)
from torch import nn

DIMS = (8, 12, 16, 24)


class ToyBackbone(nn.Module):
    """Strided convs giving maps at strides 4, 8, 16, 32 (ceil division, like the PPMA stem)."""

    def __init__(self, dims=DIMS) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], 3, 2, 1), nn.Conv2d(dims[0], dims[0], 3, 2, 1)
        )
        pairs = zip(dims, dims[1:], strict=False)
        self.downs = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in pairs)

    def forward(self, x):
        x = self.stem(x)
        maps = [x]
        for down in self.downs:
            x = down(x)
            maps.append(x)
        return maps


def _model(num_classes=5, channels=16, aux=True):
    return create_segmentation_model(
        ToyBackbone(), num_classes, channels=channels, aux_channels=8 if aux else None
    )


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (33, 17), (5, 7)])
def test_logits_at_input_resolution_for_odd_sizes(size):
    torch.manual_seed(0)
    model = _model().train()
    x = torch.randn(2, 3, *size)
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (2, 5, *size)
    assert aux.shape == (2, 5, *size)
    model.eval()
    assert model(x).shape == (2, 5, *size)


def test_without_auxiliary_head_aux_is_none():
    model = _model(aux=False).train()
    logits, aux = model(torch.randn(2, 3, 32, 32), return_aux=True)
    assert aux is None and logits.shape == (2, 5, 32, 32)


def test_every_parameter_receives_gradient():
    torch.manual_seed(0)
    model = _model().train()
    logits, aux = model(torch.randn(2, 3, 40, 40), return_aux=True)
    (logits.square().mean() + aux.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_state_dict_follows_mmsegmentation_layout():
    model = _model(num_classes=5, channels=16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "decode_head.conv_seg.weight": (5, 16, 1, 1),
        "decode_head.conv_seg.bias": (5,),
        "decode_head.psp_modules.0.1.conv.weight": (16, 24, 1, 1),
        "decode_head.psp_modules.3.1.bn.running_var": (16,),
        "decode_head.bottleneck.conv.weight": (16, 24 + 4 * 16, 3, 3),
        "decode_head.bottleneck.bn.weight": (16,),
        "decode_head.lateral_convs.0.conv.weight": (16, 8, 1, 1),
        "decode_head.lateral_convs.2.conv.weight": (16, 16, 1, 1),
        "decode_head.fpn_convs.2.conv.weight": (16, 16, 3, 3),
        "decode_head.fpn_bottleneck.conv.weight": (16, 4 * 16, 3, 3),
        "auxiliary_head.convs.0.conv.weight": (8, 16, 3, 3),
        "auxiliary_head.conv_seg.weight": (5, 8, 1, 1),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    head_keys = {k for k in shapes if k.startswith("decode_head.")}
    assert not any(".conv.bias" in k for k in head_keys)  # conv blocks are bias-free before BN
    assert "decode_head.lateral_convs.3.conv.weight" not in shapes  # top level goes through PPM
    assert "decode_head.fpn_convs.3.conv.weight" not in shapes


def _block(x, sd, prefix, padding):
    # conv → BN (eval statistics) → ReLU, written from the parameters alone.
    y = F.conv2d(x, sd[prefix + ".conv.weight"], padding=padding)
    y = F.batch_norm(
        y,
        sd[prefix + ".bn.running_mean"],
        sd[prefix + ".bn.running_var"],
        sd[prefix + ".bn.weight"],
        sd[prefix + ".bn.bias"],
        training=False,
        eps=1e-5,
    )
    return F.relu(y)


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("fuse_kernel_size", [3, 1])
def test_uperhead_matches_a_functional_oracle(fuse_kernel_size):
    """The head equals UPerNet written out by hand: PPM, top-down FPN, fuse, classify."""
    torch.manual_seed(0)
    head = UPerHead(DIMS, num_classes=3, channels=6, fuse_kernel_size=fuse_kernel_size).eval()
    with torch.no_grad():  # non-trivial BN statistics so the oracle checks them too
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    sd = head.state_dict()
    sizes = [(13, 11), (7, 6), (4, 3), (2, 2)]
    feats = [torch.randn(2, c, *s) for c, s in zip(DIMS, sizes, strict=True)]

    top = feats[3]
    pooled = [
        _up(_block(F.adaptive_avg_pool2d(top, s), sd, f"psp_modules.{i}.1", 0), top.shape[-2:])
        for i, s in enumerate((1, 2, 3, 6))
    ]
    lat = [_block(feats[i], sd, f"lateral_convs.{i}", 0) for i in range(3)]
    lat.append(_block(torch.cat([top, *pooled], 1), sd, "bottleneck", 1))
    lat[2] = lat[2] + _up(lat[3], sizes[2])
    lat[1] = lat[1] + _up(lat[2], sizes[1])
    lat[0] = lat[0] + _up(lat[1], sizes[0])
    outs = [_block(lat[i], sd, f"fpn_convs.{i}", 1) for i in range(3)] + [lat[3]]
    fused = torch.cat([_up(o, sizes[0]) for o in outs], 1)
    fused = _block(fused, sd, "fpn_bottleneck", fuse_kernel_size // 2)
    expected = F.conv2d(fused, sd["conv_seg.weight"], sd["conv_seg.bias"])

    with torch.no_grad():
        got = head(feats)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fcn_head_reads_its_stage():
    head = FCNHead(16, num_classes=4, channels=8, in_index=2).eval()
    feats = [torch.randn(1, c, 9 - i, 9 - i) for i, c in enumerate(DIMS)]
    assert head(feats).shape == (1, 4, 7, 7)


def test_channels_from_attribute_or_probe():
    probe = backbone_channels(ToyBackbone())
    assert probe == list(DIMS)
    declared = ToyBackbone()
    declared.out_channels = (1, 2, 3, 4)
    assert backbone_channels(declared) == [1, 2, 3, 4]
    timm_like = ToyBackbone()
    timm_like.feature_info = [{"num_chs": c, "reduction": 4 * 2**i} for i, c in enumerate(DIMS)]
    timm_like.out_indices = (1, 3)
    assert backbone_channels(timm_like) == [12, 24]


def test_builds_on_a_registered_ppma_backbone():
    torch.manual_seed(0)
    model = create_segmentation_model("ppma_nano", 4, channels=8, aux_channels=8).eval()
    assert backbone_channels(model.backbone) == [32, 64, 128, 256]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 38)).shape == (1, 4, 45, 38)


def test_bad_inputs_name_the_argument():
    head = UPerHead(DIMS, num_classes=3, channels=6)
    with pytest.raises(ValueError, match="features: expected 4 maps"):
        head([torch.randn(1, 8, 4, 4)])
    bad = [torch.randn(1, c, 4, 4) for c in (8, 12, 99, 24)]
    with pytest.raises(ValueError, match=r"features\[2\]"):
        head(bad)
    with pytest.raises(ValueError, match="num_classes"):
        UPerHead(DIMS, num_classes=0)
    with pytest.raises(ValueError, match="fuse_kernel_size must be odd"):
        UPerHead(DIMS, num_classes=3, fuse_kernel_size=2)
    with pytest.raises(ValueError, match="x must have shape"):
        SegmentationModel(ToyBackbone(), head)(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="backbone_kwargs"):
        create_segmentation_model(ToyBackbone(), 3, depth=2)


@pytest.mark.parametrize(
    "shape,size",
    [((2, 3, 16, 16), (64, 64)), ((1, 5, 7, 9), (31, 17)), ((2, 4, 40, 30), (13, 11)),
     ((1, 2, 1, 1), (5, 6)), ((1, 2, 5, 6), (1, 1)), ((3, 8, 8), (8, 20))],
)  # fmt: skip
def test_resize_equals_bilinear_interpolation_values_and_gradients(shape, size):
    # The separable GEMM form must reproduce F.interpolate(bilinear, align_corners=False).
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    batched = x if x.dim() == 4 else x[None]
    got = _resize(batched, size)
    expected = F.interpolate(batched, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(expected)
    (g_got,) = torch.autograd.grad(got, x, grad)
    (g_expected,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)
