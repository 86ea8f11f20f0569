"""Architecture facts (docs/design.md §2.5), the modules' math against independent formulas, and the
model API (shapes at odd sizes, features, intermediates, ppma_ops backends, checkpointing)."""

from __future__ import annotations

import math

import ppma_ops
import pytest
import torch
import torch.nn.functional as F
from ppma_models import PPMA, create_model, get_config, list_models
from ppma_models.decay import DecayField
from ppma_models.residual_conv import residual_depthwise_conv
from ppma_models.rope import FlatRotaryEmbedding, apply_rotary, rotary_frequencies
from ppma_models.testing import seeded_model
from torch.utils.flop_counter import FlopCounterMode

# (name, parameters at 1000 classes, GFLOPs at 224² with a multiply-add counted once)
PUBLISHED = [
    ("ppma_tiny", 14_335_272, 2.70),
    ("ppma_small", 26_969_472, 4.90),
    ("ppma_base", 54_158_524, 10.59),
]


def _meta_model(name: str, **kwargs) -> PPMA:
    with torch.device("meta"):
        return create_model(name, **kwargs)


@pytest.mark.parametrize(("name", "params", "gflops"), PUBLISHED)
def test_published_parameter_count_and_flops(name, params, gflops):
    model = _meta_model(name).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    counter = FlopCounterMode(display=False)
    # The reference ops are plain PyTorch, whose multiply-adds the counter sees.
    with torch.no_grad(), counter, ppma_ops.use_backend("reference"):
        model(torch.empty(1, 3, 224, 224, device="meta"))
    # FlopCounterMode counts 2 FLOPs per multiply-add; the paper's table counts one.
    assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(gflops, abs=0.02)


def test_registry_lists_the_models_and_rejects_unknown_names():
    assert {"ppma_tiny", "ppma_small", "ppma_base", "ppma_nano"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'ppma_huge'.*ppma_tiny"):
        create_model("ppma_huge")
    with pytest.raises(TypeError, match="unknown PPMAConfig field"):
        create_model("ppma_nano", depth=3)
    # the implementation is ppma_ops' choice, not an argument of the model
    with pytest.raises(TypeError, match=r"unknown PPMAConfig field\(s\) \['attention'\]"):
        create_model("ppma_nano", attention="reference")


def test_published_configs_follow_the_paper_table():
    t, s, b = (get_config(n) for n in ("ppma_tiny", "ppma_small", "ppma_base"))
    assert t.attention_kinds == ("X", "X", "V", "V")
    assert s.attention_kinds == b.attention_kinds == ("X", "X", "X", "V")
    assert t.head_dims == (16, 32, 32, 32) and b.head_dims == (16, 32, 32, 32)
    assert b.layer_scale == (False, False, True, True) and b.layer_scale_init == 1e-6
    assert (t.drop_path_rate, s.drop_path_rate, b.drop_path_rate) == (0.1, 0.15, 0.4)


def test_stochastic_depth_rises_linearly_from_zero():
    model = _meta_model("ppma_small")
    rates = [blk.drop_path.p for stage in model.stages for blk in stage.blocks]
    assert len(rates) == 29
    expected = [0.15 * i / 28 for i in range(29)]
    assert rates == pytest.approx(expected, abs=1e-7)
    assert _meta_model("ppma_nano", drop_path_rate=0.3).stages[-1].blocks[-1].drop_path.p == (
        pytest.approx(0.3)
    )


def test_layer_scale_only_where_configured():
    model = _meta_model("ppma_base")
    for i, stage in enumerate(model.stages):
        for blk in stage.blocks:
            assert (blk.attn_layer_scale is not None) == (i >= 2)
    assert "stages.2.blocks.0.ffn_layer_scale" in dict(model.named_parameters())


def test_model_wide_init_and_decay_field_init():
    model = seeded_model("ppma_nano")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    # trunc-normal std 0.02 (truncated at ±2 absolute, so effectively untruncated)
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears if m.bias is not None)
    # the attention's own init is overridden: out_proj is not xavier (std 0.18 for C=32)
    out_proj = model.stages[0].blocks[0].attn.out_proj.weight
    assert out_proj.std().item() < 0.03
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    decays = [m for m in model.modules() if isinstance(m, DecayField)]
    dt_bias = torch.cat([m.dt_bias for m in decays]).detach()
    a = torch.cat([m.A_log for m in decays]).detach().exp()
    dt = F.softplus(dt_bias)  # dt_bias is the inverse softplus of dt
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert a.min() >= 1.0 and a.max() <= 1.1


def test_no_weight_decay_names_exactly_the_decay_parameters():
    model = _meta_model("ppma_tiny")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert names == {n for n in params if n.endswith((".dt_bias", ".A_log"))}
    assert len(names) == 2 * sum(get_config("ppma_tiny").depths)


def test_rotary_frequencies_and_rotation_follow_the_pair_formula():
    d, h, w = 8, 3, 5
    theta = rotary_frequencies(d, torch.float64)
    m = torch.arange(d // 2, dtype=torch.float64)
    assert torch.allclose(theta[0::2], 10000 ** (-m / (d // 2 - 1)))
    assert torch.equal(theta[0::2], theta[1::2])
    rotation = FlatRotaryEmbedding(d)(h, w, device=torch.device("cpu"), dtype=torch.float64)
    assert rotation.shape == (h, w, d // 2) and rotation.dtype == torch.complex128
    x = torch.randn(2, h, w, d, dtype=torch.float64)
    rotated = apply_rotary(x, rotation)
    # Oracle (docs/design.md §2.2): pair (x_2m, x_2m+1) rotated by the angle u·θ_m, u = i·W + j.
    u = torch.arange(h * w, dtype=torch.float64).reshape(h, w, 1)
    angle = u * theta[0::2]
    even, odd = x[..., 0::2], x[..., 1::2]
    assert torch.allclose(rotated[..., 0::2], even * angle.cos() - odd * angle.sin())
    assert torch.allclose(rotated[..., 1::2], odd * angle.cos() + even * angle.sin())
    # the real-valued path (used for bf16/fp16) agrees with the complex one
    half = apply_rotary(x.bfloat16(), rotation)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.double(), rotated, atol=0.05)


def test_rotary_cache_is_keyed_by_grid_and_dtype():
    rope = FlatRotaryEmbedding(4, cache_size=2)
    cpu = torch.device("cpu")
    a = rope(2, 3, device=cpu, dtype=torch.float32)
    assert rope(2, 3, device=cpu, dtype=torch.float32) is a
    b = rope(3, 2, device=cpu, dtype=torch.float32)
    # same flat indices 0..5, different grid shape: same angles, reshaped
    assert b.shape == (3, 2, 2)
    assert torch.equal(a.reshape(6, 2), b.reshape(6, 2))
    assert rope(2, 3, device=cpu, dtype=torch.float64).dtype == torch.complex128
    assert len(rope._cache) == 2


def test_decay_field_matches_the_formula_per_head():
    torch.manual_seed(1)
    field = DecayField(12, 3)
    with torch.no_grad():
        field.dt_bias.copy_(torch.tensor([-3.0, 0.5, 1.0]))
        field.A_log.copy_(torch.tensor([0.0, 0.05, -0.2]))
    x = torch.randn(2, 4, 5, 12)
    log_alpha, log_beta = field(x)
    assert log_alpha.shape == log_beta.shape == (2, 3, 4, 5)
    w = field.proj.weight.detach()
    for head in range(3):
        xs = x[..., 4 * head : 4 * head + 4]
        rate = math.exp(field.A_log[head].item())
        for out, row in ((log_alpha, 0), (log_beta, 1)):
            delta = xs @ w[row]
            expect = -rate * torch.log1p(torch.exp(delta + field.dt_bias[head].item()))
            assert torch.allclose(out[:, head], expect, atol=1e-6)
    assert (log_alpha < 0).all() and (log_beta < 0).all()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_forward_backward_at_odd_size(backend):
    model = seeded_model("ppma_nano", num_classes=7, drop_path_rate=0.0)
    x = torch.randn(1, 3, 97, 131, requires_grad=True)
    with ppma_ops.use_backend(backend):
        logits = model(x)
        assert logits.shape == (1, 7)
        logits.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # every decay head receives gradient (α, β really enter the computation)
    assert model.stages[2].blocks[0].attn.decay.proj.weight.grad.abs().sum() > 0


def test_features_at_odd_size_are_normalised_stage_outputs():
    model = seeded_model("ppma_nano", features_only=True).eval()
    for norm in model.out_norms.values():  # non-trivial affine so the check means something
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        feats = model(x)
        raw = model.forward_intermediates(x, intermediates_only=True)
    sizes = [(25, 33), (13, 17), (7, 9), (4, 5)]  # ⌈·/4⌉ then halving with rounding up
    assert [tuple(f.shape) for f in feats] == [
        (1, c, h, w) for c, (h, w) in zip((32, 64, 128, 256), sizes, strict=True)
    ]
    assert model.feature_channels() == [32, 64, 128, 256]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    for i, (f, r) in enumerate(zip(feats, raw, strict=True)):
        norm = model.out_norms[str(i)]
        expect = F.layer_norm(r.permute(0, 2, 3, 1), (r.shape[1],), norm.weight, norm.bias, 1e-5)
        assert torch.allclose(f, expect.permute(0, 3, 1, 2), atol=1e-5)


def test_stem_stride_2_doubles_every_grid_with_the_same_parameters():
    base = seeded_model("ppma_nano", features_only=True).eval()
    fine = create_model("ppma_nano", features_only=True, stem_stride=2).eval()
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    assert {k: v.shape for k, v in fine.state_dict().items()} == shapes
    fine.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        feats = fine(x)
        # Only the first convolution's stride differs: at stride 1 its output holds the
        # stride-2 output at every other pixel.
        assert torch.allclose(fine.stem.conv1(x)[..., ::2, ::2], base.stem.conv1(x), atol=1e-6)
    sizes = [(49, 66), (25, 33), (13, 17), (7, 9)]  # ⌈·/2⌉ then halving with rounding up
    assert [tuple(f.shape[2:]) for f in feats] == sizes
    assert [i["reduction"] for i in fine.feature_info] == [2, 4, 8, 16]
    assert fine.config.strides == (2, 4, 8, 16) and base.config.strides == (4, 8, 16, 32)
    with pytest.raises(ValueError, match=r"stem_stride must be one of \(2, 4\), got 8"):
        create_model("ppma_nano", stem_stride=8)


def test_features_subset_and_intermediates_options():
    model = create_model("ppma_nano", features_only=True, out_indices=(3, 1))
    assert model.out_indices == (1, 3) and set(model.out_norms) == {"1", "3"}
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        feats = model(x)
        final, inter = model.forward_intermediates(x, indices=2, output_fmt="NHWC")
        early = model.forward_intermediates(
            x, indices=[0], stop_early=True, intermediates_only=True
        )
    assert [f.shape[1] for f in feats] == [64, 256]
    assert [tuple(t.shape) for t in inter] == [(1, 4, 3, 128), (1, 2, 2, 256)]
    assert final.shape == (1, 256, 2, 2)
    assert torch.equal(final, inter[-1].permute(0, 3, 1, 2))
    assert early[0].shape == (1, 32, 16, 12)
    with pytest.raises(ValueError, match="no per-stage LayerNorm"):
        model.forward_intermediates(x, indices=[0], norm=True)
    with pytest.raises(ValueError, match="out_indices"):
        create_model("ppma_nano", features_only=True, out_indices=(4,))


def test_classifier_on_tiny_grey_images():
    model = create_model("ppma_nano", num_classes=10, in_chans=1).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model(x)
        assert model(torch.randn(1, 1, 1, 1)).shape == (1, 10)  # 1×1 input still works
    assert feats.shape == (3, 256, 1, 1)
    assert pooled.shape == (3, 1024)
    assert torch.allclose(model.head.fc(pooled), logits)
    model.reset_classifier(4)
    assert model(x).shape == (3, 4)


def test_bad_inputs_give_clear_errors():
    model = create_model("ppma_nano")
    with pytest.raises(ValueError, match="3 channels.*in_chans=1|in_chans=3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([1, 2, 3])
    with pytest.raises(ValueError, match="x is on meta but the model is on cpu"):
        model(torch.empty(1, 3, 32, 32, device="meta"))
    with pytest.raises(TypeError, match="float64 but the model's weights are torch.float32"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    features = create_model("ppma_nano", features_only=True)
    with pytest.raises(RuntimeError, match="no classifier head"):
        features.forward_head(torch.randn(1, 256, 1, 1))


def test_ppma_ops_backend_routes_every_op(monkeypatch):
    # The model calls the public ppma_ops functions only; ppma_ops' backend decides whether
    # they run the reference. Count both levels: 5 attention calls (one per block) and 15
    # depthwise convolutions (CPE, LePE, FFN: three per block) per forward pass.
    public = {"attention": 0, "conv": 0}
    reference = {"attention": 0, "conv": 0}

    def spy(counts, kind, op):
        def wrapped(*args, **kwargs):
            counts[kind] += 1
            return op(*args, **kwargs)

        return wrapped

    for name, kind in (
        ("polyline_attention", "attention"),
        ("criss_cross_attention", "attention"),
        ("depthwise_conv2d", "conv"),
    ):
        monkeypatch.setattr(ppma_ops, name, spy(public, kind, getattr(ppma_ops, name)))
        op = getattr(ppma_ops.reference, name)
        monkeypatch.setattr(ppma_ops.reference, name, spy(reference, kind, op))
    model = seeded_model("ppma_nano").eval()
    x = torch.randn(1, 3, 40, 40)
    # use_backend restores the process's choice afterwards, whatever set_attention did inside.
    with torch.no_grad(), ppma_ops.use_backend(ppma_ops.get_backend()):
        with ppma_ops.use_backend("reference"):
            assert model.attention == "reference"
            ref = model(x)
        assert public == reference == {"attention": 5, "conv": 15}
        model.set_attention("native")  # the process-wide alias of ppma_ops.set_backend
        assert model.attention == ppma_ops.get_backend() == "native"
        nat = model(x)
        with pytest.raises(ValueError, match="backend must be one of"):
            model.set_attention("fast")
    assert public == {"attention": 10, "conv": 30}
    if ppma_ops.native_available():  # the native kernels ran, not the reference
        assert reference == {"attention": 5, "conv": 15}
    assert torch.allclose(nat, ref, rtol=1e-4, atol=1e-5)
    assert not any(hasattr(m, "impl") for m in model.modules())


def test_gradient_checkpointing_gives_the_same_gradients():
    model = seeded_model("ppma_nano", drop_path_rate=0.0)
    x = torch.randn(2, 3, 20, 28)

    def grads():
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    checkpointed = grads()
    for name, g in plain.items():
        assert torch.allclose(checkpointed[name], g, rtol=1e-4, atol=1e-6), name


def test_drop_path_is_active_in_training_only():
    model = seeded_model("ppma_nano", drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_torch_compile_traces_the_whole_model():
    model = seeded_model("ppma_nano", num_classes=5).eval()
    x = torch.randn(2, 3, 20, 24)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_residual_depthwise_conv_equals_identity_plus_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 5, padding=2, groups=6)
    x = torch.randn(2, 7, 9, 6, dtype=torch.float64, requires_grad=True)
    conv = conv.double()
    fused = residual_depthwise_conv(x, conv)
    plain = x + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.allclose(fused, plain)
    g = torch.randn_like(plain)
    grads_fused = torch.autograd.grad(fused, (x, conv.weight, conv.bias), g)
    grads_plain = torch.autograd.grad(plain, (x, conv.weight, conv.bias), g)
    for a, b in zip(grads_fused, grads_plain, strict=True):
        assert torch.allclose(a, b)
    # the module's own weight is not modified by the folding
    before = conv.weight.detach().clone()
    residual_depthwise_conv(x, conv)
    assert torch.equal(conv.weight, before)


def test_inference_and_training_modes_agree():
    """The no-grad path (in-place residuals) computes what the autograd path computes."""
    model = seeded_model("ppma_nano").eval()
    x = torch.randn(2, 3, 30, 26)
    with torch.no_grad():
        fast = model(x)
    assert torch.allclose(model(x), fast, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bf16_autocast_runs_and_tracks_float32(backend):
    # Under autocast the projections are bf16 while the decay head is not: the attention
    # layer must hand the ops one dtype. The result should stay close to the float32 model.
    model = seeded_model("ppma_nano", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), ppma_ops.use_backend(backend):
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert torch.isfinite(low).all()
    err = (low.float() - reference).norm() / reference.norm()
    assert err < 0.1, err
    with torch.autocast("cpu", dtype=torch.bfloat16), ppma_ops.use_backend(backend):
        model.train()(x).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
