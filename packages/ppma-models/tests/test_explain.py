"""explain: mask panels against ppma_mask's polyline mask, attention maps against the
reference operators and the layers' own outputs, the picture grid and the arrays file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ppma_mask import polyline_mask
from ppma_models import create_model
from ppma_models.attention import MaskedAttention
from ppma_models.explain import (
    PANELS,
    explain,
    query_attention,
    query_masks,
    write_explanation_png,
)
from ppma_models.segmentation import create_segmentation_model
from ppma_ops import reference

SMALL = {"depths": (1, 1, 2, 1), "head_hidden": 32}


def _trained_looking_decays(model: torch.nn.Module, seed: int) -> None:
    """Decays well inside (0, 1) (a fresh model's are all ≈ 0.99), so masks have contrast."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("decay.A_log"):
            p.copy_(torch.rand(p.shape, generator=g) - 1.5)
        elif name.endswith("decay.dt_bias"):
            p.zero_()
        elif name.endswith("decay.proj.weight"):
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("ppma_nano", num_classes=5, **SMALL)
    with torch.no_grad():
        _trained_looking_decays(m, 0)
    return m


def _random_log_decays(shape, g, blocked: float = 0.0) -> torch.Tensor:
    t = -torch.rand(shape, generator=g, dtype=torch.float64) * 2
    if blocked:
        t = t.masked_fill(torch.rand(shape, generator=g) < blocked, float("-inf"))
    return t


def test_mask_panels_equal_ppma_mask(model):
    x = torch.randn(3, 80, 72, generator=torch.Generator().manual_seed(1))
    result = explain(model, x, pixel=(50, 20))
    assert [(layer.stage, layer.kind) for layer in result.layers] == [
        (0, "X"),
        (1, "X"),
        (2, "V"),
        (3, "V"),
    ]
    for layer in result.layers:
        h, w = layer.grid
        u = layer.query[0] * w + layer.query[1]
        for head in range(layer.heads):
            a, b = layer.log_alpha[head], layer.log_beta[head]
            np.testing.assert_allclose(
                layer.mask_v2h[head], polyline_mask(a, b, "v2h")[u].reshape(h, w), atol=1e-12
            )
            np.testing.assert_allclose(
                layer.mask_h2v[head], polyline_mask(a, b, "h2v")[u].reshape(h, w), atol=1e-12
            )
            np.testing.assert_allclose(
                layer.mask_mean[head],
                0.5 * polyline_mask(a, b, "sum")[u].reshape(h, w),
                atol=1e-12,
            )
        assert layer.mask_v2h.min() < 0.5  # decays with contrast: not a vacuous comparison


@pytest.mark.parametrize("seed", range(4))
def test_query_masks_with_blocked_steps(seed):
    g = torch.Generator().manual_seed(seed)
    heads, h, w = 2, 5, 7
    la = _random_log_decays((heads, h, w), g, blocked=0.15)
    lb = _random_log_decays((heads, h, w), g, blocked=0.15)
    for query in [(0, 0), (2, 3), (4, 6)]:
        v2h, h2v = query_masks(la, lb, query)
        u = query[0] * w + query[1]
        for head in range(heads):
            for got, path in ((v2h, "v2h"), (h2v, "h2v")):
                expected = polyline_mask(la[head].numpy(), lb[head].numpy(), path)[u]
                np.testing.assert_allclose(
                    got[head].exp().numpy(), expected.reshape(h, w), atol=1e-12
                )


@pytest.mark.parametrize("kind", ["V", "X"])
@pytest.mark.parametrize("seed", range(3))
def test_attention_maps_weigh_values_as_the_reference_operator(kind, seed):
    g = torch.Generator().manual_seed(seed)
    heads, h, w, d = 3, 4, 6, 8
    q, k, v = (torch.randn(1, heads, h, w, d, generator=g, dtype=torch.float64) for _ in "qkv")
    la = _random_log_decays((1, heads, h, w), g, blocked=0.1 * seed)
    lb = _random_log_decays((1, heads, h, w), g, blocked=0.1 * seed)
    op = reference.polyline_attention if kind == "V" else reference.criss_cross_attention
    expected = op(q, k, v, la, lb, scale=1.0)[0]  # (heads, h, w, d)
    for i in range(h):
        for j in range(w):
            attn = query_attention(q[0], k[0], la[0], lb[0], (i, j), kind)
            torch.testing.assert_close(attn.sum(dim=(1, 2)), torch.ones(heads, dtype=attn.dtype))
            out = torch.einsum("hkl,hkld->hd", attn, v[0])
            torch.testing.assert_close(out, expected[:, i, j], rtol=1e-10, atol=1e-12)


def test_attention_maps_rebuild_each_layers_output(model):
    """Every query's map, applied to the layer's values, plus LePE and the output projection,
    gives exactly what the layer computed in the model's forward pass."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MaskedAttention)}
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args, out)))
        for n, m in layers.items()
    ]
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    for name in ["stages.1.blocks.0.attn", "stages.2.blocks.1.attn"]:
        module, ((tokens, _), out) = layers[name], seen[name]
        result = explain(model, x, pixel=(0, 0), layers=[name]).layers[0]
        _, h, w, c = tokens.shape
        with torch.no_grad():
            v = module.v_proj(tokens).view(1, h, w, module.heads, -1)[0].double()
            mixed = torch.zeros(h, w, c, dtype=torch.float64)
            for i in range(h):
                for j in range(w):
                    # each query token through the public entry point, by its cell centre
                    pixel = ((2 * i + 1) * 40 // (2 * h), (2 * j + 1) * 56 // (2 * w))
                    layer = explain(model, x, pixel=pixel, layers=[name]).layers[0]
                    assert layer.query == (i, j)
                    attn = torch.from_numpy(layer.attention)
                    mixed[i, j] = torch.einsum("hkl,klhd->hd", attn, v).reshape(c)
            lepe = F.conv2d(
                module.v_proj(tokens).permute(0, 3, 1, 2),
                module.lepe.weight,
                module.lepe.bias,
                padding=2,
                groups=c,
            ).permute(0, 2, 3, 1)
            rebuilt = module.out_proj(mixed.float()[None] + lepe)
        torch.testing.assert_close(rebuilt, out, rtol=1e-4, atol=1e-5)
        assert result.kind == ("X" if name.startswith("stages.1") else "V")


def test_segmentation_model_and_layer_choice(tmp_path):
    torch.manual_seed(0)
    seg = create_segmentation_model(
        "ppma_nano", num_classes=3, channels=8, aux_channels=None, **SMALL
    )
    seg.train()
    x = torch.randn(1, 3, 64, 48)
    result = explain(seg, x, pixel=(63, 47), layers="all")
    assert seg.training  # put back
    assert not any(m._forward_pre_hooks for m in seg.modules())
    assert [layer.name for layer in result.layers] == [
        f"backbone.stages.{s}.blocks.{b}.attn" for s, b in [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    ]
    assert result.output.shape == (3, 64, 48)
    for layer in result.layers:  # the bottom-right pixel is in every grid's last token
        assert layer.query == (layer.grid[0] - 1, layer.grid[1] - 1)


def test_picture_grid_and_arrays(model, tmp_path):
    x = torch.randn(1, 3, 64, 64)
    result = explain(model, x)
    assert result.pixel == (32, 32)
    png = write_explanation_png(result, tmp_path / "grid.png", heads=[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        width, height = im.size
    assert height > width * 0.5  # four rows (one head per layer) of seven panels
    assert len(PANELS) == 7
    npz = result.save_npz(tmp_path / "maps.npz")
    with np.load(npz) as z:
        files = set(z.files)
        assert {"image", "pixel", "output"} <= files
        for layer in result.layers:
            prefix = f"stage{layer.stage}/block{layer.block}/"
            for key in ("alpha", "beta", "mask_v2h", "mask_h2v", "mask_mean", "attention"):
                np.testing.assert_array_equal(z[prefix + key], layer.arrays()[key])
        np.testing.assert_array_equal(z["pixel"], [32, 32])


def test_bad_arguments_are_named(model, tmp_path):
    with pytest.raises(ValueError, match="pixel"):
        explain(model, torch.randn(3, 32, 32), pixel=(32, 0))
    with pytest.raises(ValueError, match="image must be"):
        explain(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="not attention layers"):
        explain(model, torch.randn(3, 32, 32), layers=["stages.0.blocks.0"])
    with pytest.raises(ValueError, match="layers must be"):
        explain(model, torch.randn(3, 32, 32), layers="first")
    with pytest.raises(ValueError, match="no PPMA attention layers"):
        explain(torch.nn.Conv2d(3, 3, 1), torch.randn(3, 8, 8))
    result = explain(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="no layer has heads"):
        write_explanation_png(result, tmp_path / "x.png", heads=[99])
