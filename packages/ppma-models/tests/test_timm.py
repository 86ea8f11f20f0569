"""PPMA through timm: create_model, features_only, forward_intermediates, pretrained_cfg, and
weights going from timm to ppma_models and back (the authors' .pth through timm too)."""

from __future__ import annotations

import argparse

import pytest
import torch

timm = pytest.importorskip("timm")

import ppma_models  # noqa: E402
from ppma_models import timm_support  # noqa: E402
from ppma_models.convert import convert_to_upstream  # noqa: E402

X = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_registered_names():
    assert set(timm.list_models("ppma*")) >= set(timm_support.TIMM_MODELS)
    for name in timm_support.TIMM_MODELS:
        assert timm.is_model(name)


@pytest.mark.parametrize("name", timm_support.TIMM_MODELS)
def test_pretrained_cfg_is_the_registry_s(name):
    cfg = timm.models.get_pretrained_cfg(name)
    ours = ppma_models.get_pretrained_cfg(name)
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes"):
        assert getattr(cfg, key) == getattr(ours, key), key
    assert cfg.license == ours.license and ours.license
    assert cfg.origin_url == ours.url and ours.url.startswith("https://")
    assert all(any(n in note for note in cfg.notes) for n in ours.upstream_names)
    assert not cfg.has_weights  # the repository page is no file timm could download
    assert cfg.first_conv == "stem.conv1" and cfg.classifier == "head.fc"


def test_classifier_is_a_ppma_model_with_timm_settings():
    model = timm.create_model("ppma_tiny", num_classes=10, drop_path_rate=0.0).eval()
    assert isinstance(model, ppma_models.PPMA)
    assert model.num_classes == 10
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    config = timm.data.resolve_data_config(model=model)
    expected = ppma_models.get_pretrained_cfg("ppma_tiny")
    assert config["crop_pct"] == expected.crop_pct
    assert tuple(config["mean"]) == expected.mean and config["interpolation"] == "bicubic"
    with torch.no_grad():
        assert model(X).shape == (2, 10)


def test_features_only_reports_channels_and_reductions_like_timm():
    torch.manual_seed(0)
    backbone = timm.create_model("ppma_tiny", features_only=True, out_indices=(1, 2, 3)).eval()
    assert backbone.feature_info.channels() == [128, 256, 512]
    assert backbone.feature_info.reduction() == [8, 16, 32]
    assert backbone.feature_info.module_name() == ["stages.1", "stages.2", "stages.3"]
    reference = ppma_models.create_model("ppma_tiny").eval()
    reference.load_state_dict(backbone.model.state_dict(), strict=False)
    with torch.no_grad():
        maps = backbone(X)
        expected = reference.forward_intermediates(X, (1, 2, 3), intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 6), (2, 256, 4, 3), (2, 512, 2, 2)]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_forward_intermediates_signature_and_values():
    model = timm.create_model("ppma_tiny", num_classes=0).eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(X, indices=2, output_fmt="NHWC")
        features = model.forward_features(X)
    assert [t.shape[-1] for t in inter] == [256, 512]  # the last two stages, channels last
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(inter[-1].permute(0, 3, 1, 2), features)


def test_signatures_and_attributes_match_timm_s_convnext():
    """Code written for timm's models calls these by position and reads these attributes."""
    import inspect

    ours = ppma_models.create_model("ppma_tiny", num_classes=5)
    theirs = timm.create_model("convnext_atto", num_classes=5)
    for method in ("forward_intermediates", "prune_intermediate_layers", "reset_classifier"):
        mine = list(inspect.signature(getattr(ours, method)).parameters)
        other = list(inspect.signature(getattr(theirs, method)).parameters)
        assert mine[: len(other)] == other, method
    assert ours.num_features == 512 and ours.head_hidden_size == 1024
    with torch.no_grad():
        features = ours.forward_features(X)
        assert ours.forward_head(features, pre_logits=True).shape == (2, 1024)
        ours.reset_classifier(3, reset_other=True)  # the head is the average of the features
        assert ours.head_hidden_size == 512 and ours(X).shape == (2, 3)
        pooled = ours.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))


def test_prune_intermediate_layers_keeps_what_the_indices_need():
    torch.manual_seed(3)
    model = timm.create_model("ppma_tiny", num_classes=10).eval()
    with torch.no_grad():
        expected = model.forward_intermediates(X, (0, 1), intermediates_only=True)
    take = model.prune_intermediate_layers((0, 1))
    assert take == [0, 1]
    assert len(model.stages) == 2 and model.head is None
    assert [i["reduction"] for i in model.feature_info] == [4, 8]
    with torch.no_grad():
        got = model.forward_intermediates(X, take, intermediates_only=True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert model.prune_intermediate_layers(1) == [1]  # an int: the last n of what is left


def test_state_dict_saved_by_timm_loads_in_ppma_models_and_back(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("ppma_tiny", num_classes=7).eval()
    timm.models.save_for_hf(model, tmp_path / "hf", safe_serialization=True)
    ours = ppma_models.create_model("ppma_tiny", num_classes=7).eval()
    ppma_models.load_checkpoint(ours, tmp_path / "hf" / "model.safetensors")
    _same_weights(ours, model)
    ppma_models.save_safetensors(ours, tmp_path / "ours.safetensors")
    again = timm.create_model(
        "ppma_tiny",
        num_classes=7,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "ours.safetensors"), "num_classes": 7},
    ).eval()
    _same_weights(again, model)
    with torch.no_grad():
        torch.testing.assert_close(again(X), model(X))


def test_authors_checkpoint_through_pretrained_cfg_overlay(tmp_path):
    torch.manual_seed(2)
    raw = ppma_models.create_model("ppma_tiny").eval()
    ema = ppma_models.create_model("ppma_tiny").eval()
    path = tmp_path / "ppma_tiny_authors.pth"
    torch.save(
        {
            "model": convert_to_upstream(raw.state_dict()),
            "model_ema": convert_to_upstream(ema.state_dict()),
            "epoch": 299,
            "args": argparse.Namespace(model="PPMAViT_T"),
        },
        path,
    )
    model = timm.create_model(
        "ppma_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).eval()
    _same_weights(model, ema)  # the EMA weights, as the published numbers are
    tuned = timm.create_model(
        "ppma_tiny", num_classes=5, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    )
    assert tuned.head.fc.weight.shape == (5, 1024)  # a fresh classifier, the rest loaded
    torch.testing.assert_close(tuned.stem.conv1.weight, ema.stem.conv1.weight)
    backbone = timm.create_model(
        "ppma_tiny",
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
    )
    torch.testing.assert_close(
        backbone.model.stages[2].blocks[0].attn.q_proj.weight,
        ema.stages[2].blocks[0].attn.q_proj.weight,
    )


def test_pretrained_without_a_file_says_so():
    with pytest.raises(RuntimeError, match="pretrained"):
        timm.create_model("ppma_tiny", pretrained=True)


@pytest.mark.parametrize("order", ["ppma_models first", "timm first"])
def test_importing_ppma_models_registers_with_timm_in_either_order(order: str) -> None:
    import subprocess
    import sys

    imports = (
        "import ppma_models, timm" if order == "ppma_models first" else "import timm, ppma_models"
    )
    code = (
        f"import sys; {imports}\n"
        "m = timm.create_model('ppma_tiny', num_classes=3)\n"
        "assert isinstance(m, ppma_models.PPMA) and m.num_classes == 3\n"
        "assert timm.__spec__.loader.__class__.__name__ != '_RegisteringLoader'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_import_ppma_models_does_not_import_timm() -> None:
    import subprocess
    import sys

    code = "import sys, ppma_models; assert 'timm' not in sys.modules, 'timm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
