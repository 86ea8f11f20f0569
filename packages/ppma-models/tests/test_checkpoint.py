"""Checkpoint files: the authors' layouts (written here, as the hub is unreachable), safety
against malicious pickles, and our safetensors format."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from ppma_models import (
    PPMA,
    CheckpointError,
    create_model,
    load_checkpoint,
    load_model,
    save_safetensors,
    save_upstream,
)
from ppma_models.convert import convert_to_upstream, from_upstream_kwargs
from ppma_models.testing import perturbed, seeded_model, write_authors_checkpoint

TOL = 1e-5
# args.model of a file written by the authors' code for a model not in the registry
UNKNOWN = "PPMAViT_small_config"


def _fixture_model(small_fixture, **kwargs) -> PPMA:
    config, num_classes = from_upstream_kwargs(small_fixture["kwargs"])
    kwargs.setdefault("num_classes", 0 if kwargs.get("features_only") else num_classes)
    return PPMA(config, **kwargs).eval()


def test_classification_checkpoint_uses_ema_weights_by_default(
    tmp_path, small_fixture, relative_error
):
    path = tmp_path / "ppma_cls.pth"
    write_authors_checkpoint(
        path, perturbed(small_fixture["state"]), small_fixture["state"], upstream_name=UNKNOWN
    )
    model = _fixture_model(small_fixture)
    result = load_checkpoint(model, path)
    assert (result.kind, result.source) == ("classification", "model_ema")
    with torch.no_grad():
        ema_logits = model(small_fixture["input"])
    assert relative_error(ema_logits, small_fixture["logits"]) <= TOL

    result = load_checkpoint(model, path, weights="model")
    assert result.source == "model"
    with torch.no_grad():
        assert relative_error(model(small_fixture["input"]), small_fixture["logits"]) > 1e-2


def test_dense_checkpoint_with_backbone_prefix_and_outnorms(
    tmp_path, small_fixture, relative_error
):
    torch.manual_seed(0)
    backbone = {
        k: v
        for k, v in small_fixture["state"].items()
        if not k.startswith(("proj.", "norm.", "head."))
    }
    dims = small_fixture["kwargs"]["embed_dims"]
    outnorms = {}
    for i, c in enumerate(dims):
        outnorms[f"outnorm{i}.weight"] = 1 + 0.3 * torch.randn(c)
        outnorms[f"outnorm{i}.bias"] = 0.3 * torch.randn(c)
    state = {f"backbone.{k}": v for k, v in {**backbone, **outnorms}.items()}
    state["decode_head.conv_seg.weight"] = torch.randn(5, 8, 1, 1)
    state["auxiliary_head.conv_seg.bias"] = torch.randn(5)
    path = tmp_path / "upernet_ppma.pth"
    torch.save(
        {"meta": {"CLASSES": ("a", "b"), "iter": 160000}, "state_dict": state, "optimizer": {}},
        path,
    )

    dense = _fixture_model(small_fixture, features_only=True, out_indices=(1, 2, 3))
    result = load_checkpoint(dense, path)
    assert result.kind == "dense"
    assert {
        "decode_head.conv_seg.weight",
        "auxiliary_head.conv_seg.bias",
        "out_norms.0.weight",
    } <= set(result.dropped)
    assert torch.equal(dense.out_norms["2"].weight, outnorms["outnorm2.weight"])

    # Oracle: the classifier built from the same backbone weights, its stage outputs put
    # through F.layer_norm with the file's outnorm parameters.
    classifier = _fixture_model(small_fixture)
    load_checkpoint(classifier, _write_cls(tmp_path, small_fixture))
    x = small_fixture["input"]
    with torch.no_grad():
        feats = dense(x)
        raw = classifier.forward_intermediates(
            x, indices=[1, 2, 3], intermediates_only=True, output_fmt="NHWC"
        )
    assert len(feats) == 3
    for i, f, r in zip((1, 2, 3), feats, raw, strict=True):
        expect = F.layer_norm(
            r, (dims[i],), outnorms[f"outnorm{i}.weight"], outnorms[f"outnorm{i}.bias"]
        )
        assert relative_error(f, expect.permute(0, 3, 1, 2)) <= TOL


def _write_cls(tmp_path, small_fixture):
    path = tmp_path / "cls.pth"
    write_authors_checkpoint(path, small_fixture["state"], upstream_name=UNKNOWN)
    return path


def test_classification_weights_initialise_a_dense_backbone(tmp_path, small_fixture):
    path = _write_cls(tmp_path, small_fixture)
    dense = _fixture_model(small_fixture, features_only=True)
    result = load_checkpoint(dense, path)
    assert result.source == "model"  # the authors' dense training reads 'model'
    assert "head.fc.weight" in result.dropped and "head.proj.weight" in result.dropped
    assert set(result.kept_init) == {
        f"out_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")
    }
    assert result.missing == [] and result.unexpected == []
    stem = small_fixture["state"]["patch_embed.proj.0.weight"]
    assert torch.equal(dense.stem.conv1.weight, stem)


def test_missing_unexpected_and_mismatched_keys(tmp_path, small_fixture):
    state = dict(small_fixture["state"])
    del state["layers.2.blocks.0.ffn.fc1.bias"]
    state["layers.2.blocks.0.extra"] = torch.ones(1)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    model = _fixture_model(small_fixture)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\).*ffn\.fc1\.bias.*1 unexpected"):
        load_checkpoint(model, path)
    result = load_checkpoint(model, path, strict=False)
    assert result.missing == ["stages.2.blocks.0.ffn.fc1.bias"]
    assert result.unexpected == ["layers.2.blocks.0.extra"]
    assert torch.equal(model.stem.conv1.weight, small_fixture["state"]["patch_embed.proj.0.weight"])

    other = create_model("ppma_nano", num_classes=10)
    with pytest.raises(CheckpointError, match="head size"):  # found by the rotary check
        load_checkpoint(other, path, strict=False)
    state = {k: v for k, v in state.items() if not k.endswith("Relpos.angle")}
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"shape\(s\) do not fit.*stem\.conv1\.weight"):
        load_checkpoint(other, path, strict=False)


def test_ddp_prefix_and_bare_state_dict(tmp_path, small_fixture):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in small_fixture["state"].items()}, path)
    model = _fixture_model(small_fixture)
    assert load_checkpoint(model, path).missing == []


def test_malicious_pickle_is_refused(tmp_path, small_fixture):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": small_fixture["state"], "hook": Payload()}, path)
    model = _fixture_model(small_fixture)
    with pytest.raises(CheckpointError, match="refusing to load.*posix.system"):
        load_checkpoint(model, path)
    assert not marker.exists()


def test_wrong_files_give_clear_errors(tmp_path, small_fixture):
    model = _fixture_model(small_fixture)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint at all")
    with pytest.raises(CheckpointError, match="neither a PyTorch checkpoint nor a safetensors"):
        load_checkpoint(model, text)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(model, tmp_path / "missing.pth")
    no_state = tmp_path / "no_state.pth"
    torch.save({"epoch": 3, "args": argparse.Namespace(model="x")}, no_state)
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_checkpoint(model, no_state)
    with pytest.raises(ValueError, match="weights must be one of"):
        load_checkpoint(model, no_state, weights="best")


def test_safetensors_round_trip_rebuilds_the_model(tmp_path):
    model = seeded_model("ppma_nano", num_classes=3, in_chans=1).eval()
    model.head.norm.running_mean.uniform_()  # buffers travel too
    path = tmp_path / "nano.safetensors"
    save_safetensors(model, path, class_names=["shirt", "shoe", "bag"], metadata={"epoch": 5})
    x = torch.randn(2, 1, 28, 28)
    rebuilt = load_model(path).eval()
    assert rebuilt.name == "ppma_nano" and rebuilt.config == model.config
    assert rebuilt.class_names == ["shirt", "shoe", "bag"]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    again = create_model("ppma_nano", num_classes=3, in_chans=1, pretrained=path)
    assert torch.equal(again.head.norm.running_mean, model.head.norm.running_mean)
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        save_safetensors(model, tmp_path / "x.safetensors", class_names=["a", "b"])


def test_safetensors_round_trip_keeps_the_stem_stride(tmp_path):
    model = seeded_model("ppma_nano", num_classes=3, in_chans=1, stem_stride=2).eval()
    path = tmp_path / "fine.safetensors"
    save_safetensors(model, path)
    rebuilt = load_model(path).eval()
    assert rebuilt.config.stem_stride == 2 and rebuilt.stem.conv1.stride == (1, 1)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_pretrained_with_other_class_count_keeps_a_fresh_classifier(tmp_path):
    source = seeded_model("ppma_nano", num_classes=1000)
    path = tmp_path / "nano1000.safetensors"
    save_safetensors(source, path)
    model = create_model("ppma_nano", num_classes=10, pretrained=path)
    assert model.head.fc.weight.shape == (10, 1024)
    assert torch.equal(model.head.proj.weight, source.head.proj.weight)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(create_model("ppma_nano", num_classes=10), path)


def test_upstream_export_and_load_model_from_the_authors_layout(tmp_path):
    model = seeded_model("ppma_nano", num_classes=4).eval()
    path = tmp_path / "export.pth"
    save_upstream(model, path)
    exported = torch.load(path, weights_only=True)["model"]
    assert "layers.0.Relpos.angle" in exported and "patch_embed.proj.10.weight" in exported
    assert set(exported) == set(convert_to_upstream(model.state_dict()))
    # an authors' classification file names its architecture in args.model
    cls = tmp_path / "cls.pth"
    tiny = create_model("ppma_tiny", num_classes=2).eval()
    write_authors_checkpoint(cls, tiny, upstream_name="PPMAViT_T")
    loaded = load_model(cls).eval()
    assert loaded.name == "ppma_tiny" and loaded.num_classes == 2
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    write_authors_checkpoint(cls, tiny, upstream_name="SomethingElse")
    with pytest.raises(CheckpointError, match="cannot tell which model"):
        load_model(cls)


def test_greyscale_stem_initialises_an_rgb_backbone(tmp_path):
    grey = seeded_model("ppma_nano", num_classes=10, in_chans=1).eval()
    path = tmp_path / "grey.safetensors"
    save_safetensors(grey, path)
    rgb = create_model("ppma_nano", features_only=True).eval()
    result = load_checkpoint(rgb, path)
    assert result.adapted == ["stem.conv1.weight"]
    assert rgb.stem.conv1.weight.shape[1] == 3
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        # A grey image given as three identical channels gets the pretrained stem response.
        torch.testing.assert_close(rgb.stem(x.expand(-1, 3, -1, -1)), grey.stem(x))
    two = create_model("ppma_nano", num_classes=10, in_chans=2)
    save_safetensors(two, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="cannot adapt a stem kernel with 2"):
        load_checkpoint(rgb, tmp_path / "two.safetensors")
