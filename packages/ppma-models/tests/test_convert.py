"""The upstream ↔ ours key converter against the authors' published key layouts."""

from __future__ import annotations

import pytest
import torch
from ppma_models import create_model, get_config
from ppma_models.convert import (
    AngleMismatchError,
    convert_from_upstream,
    convert_to_upstream,
    from_upstream_kwargs,
    to_upstream_kwargs,
)
from ppma_models.rope import rotary_frequencies

# The authors' PPMAViT_T/S/B arguments (their classification/models/PPMA.py).
UPSTREAM_KWARGS = {
    "t": ("ppma_tiny", dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2],
          num_heads=[4, 4, 8, 16], init_values=[2, 2, 2, 2], heads_ranges=[4, 4, 6, 6],
          mlp_ratios=[3, 3, 3, 3], drop_path_rate=0.1,
          chunkwise_recurrents=[True, True, False, False], layerscales=[False] * 4)),
    "s": ("ppma_small", dict(embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 4],
          num_heads=[4, 4, 8, 16], init_values=[2, 2, 2, 2], heads_ranges=[4, 4, 6, 6],
          mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.15,
          chunkwise_recurrents=[True, True, True, False], layerscales=[False] * 4)),
    "b": ("ppma_base", dict(embed_dims=[80, 160, 320, 512], depths=[4, 8, 25, 8],
          num_heads=[5, 5, 10, 16], init_values=[2, 2, 2, 2], heads_ranges=[5, 5, 6, 6],
          mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.4,
          chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, True, True],
          layer_init_values=1e-6)),
}  # fmt: skip


def _official_layout(reference_dir, variant: str) -> dict[str, tuple[int, ...]]:
    lines = (reference_dir / f"official-keys-{variant}.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["key", "shape"]
    layout = {}
    for line in lines[1:]:
        key, shape = line.split("\t")
        layout[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return layout


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_registered_configs_equal_the_authors_arguments(variant):
    name, kwargs = UPSTREAM_KWARGS[variant]
    config, num_classes = from_upstream_kwargs(kwargs)
    assert config == get_config(name)
    assert num_classes == 1000
    again, _ = from_upstream_kwargs(to_upstream_kwargs(config))
    assert again == config


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_official_layout_converts_exactly_and_back(reference_dir, variant):
    name, _ = UPSTREAM_KWARGS[variant]
    layout = _official_layout(reference_dir, variant)
    assert any(".Relpos.angle" in k for k in layout)
    with torch.device("meta"):
        model = create_model(name)
    ours_expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    upstream = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    ours = convert_from_upstream(upstream, model.config)
    assert {k: tuple(v.shape) for k, v in ours.items()} == ours_expected
    model.load_state_dict(ours, strict=True, assign=True)  # torch's own check agrees

    back = convert_to_upstream(model.state_dict())
    assert {k: tuple(v.shape) for k, v in back.items()} == layout
    assert list(back) == list(layout)  # even the order of the authors' files


def test_round_trip_is_the_identity_on_values(reference_dir):
    torch.manual_seed(0)
    layout = _official_layout(reference_dir, "b")  # the one with layer scale
    upstream = {}
    for key, shape in layout.items():
        if key.endswith("Relpos.angle"):
            upstream[key] = rotary_frequencies(shape[0])
        elif key.endswith("num_batches_tracked"):
            upstream[key] = torch.tensor(7)
        else:
            upstream[key] = torch.randn(shape)
    back = convert_to_upstream(convert_from_upstream(upstream))
    assert list(back) == list(upstream)
    for key, value in upstream.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_official_fixture_state_round_trips_bit_for_bit(small_fixture):
    state = small_fixture["state"]
    config, _ = from_upstream_kwargs(small_fixture["kwargs"])
    back = convert_to_upstream(convert_from_upstream(state, config))
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key  # incl. the regenerated Relpos.angle


def test_wrong_rotary_frequencies_are_refused(small_fixture):
    config, _ = from_upstream_kwargs(small_fixture["kwargs"])
    state = dict(small_fixture["state"])
    state["layers.1.Relpos.angle"] = state["layers.1.Relpos.angle"] * 1.01
    with pytest.raises(AngleMismatchError, match=r"layers\.1\.Relpos\.angle"):
        convert_from_upstream(state, config)
    state = dict(small_fixture["state"])
    state["layers.2.Relpos.angle"] = rotary_frequencies(8)  # wrong head size for the config
    with pytest.raises(AngleMismatchError, match="head size"):
        convert_from_upstream(state, config)


def test_dense_names_and_unknown_keys():
    up = {
        "outnorm2.weight": torch.ones(3),
        "layers.0.downsample.reduction.weight": torch.ones(1),
        "layers.2.blocks.1.gamma_1": torch.ones(1, 1, 1, 3),
        "decode_head.conv_seg.weight": torch.ones(2),
    }
    ours = convert_from_upstream(up)
    assert ours["out_norms.2.weight"] is up["outnorm2.weight"]
    assert "stages.1.downsample.conv.weight" in ours  # downsampling opens the next stage
    assert ours["stages.2.blocks.1.attn_layer_scale"].shape == (3,)
    assert "decode_head.conv_seg.weight" in ours  # passed through → reported as unexpected
    with pytest.raises(KeyError, match="no counterpart"):
        convert_to_upstream({"stages.0.blocks.0.something_new": torch.ones(1)})
    with pytest.raises(ValueError, match="unknown upstream PPMAViT argument"):
        from_upstream_kwargs({"embed_dims": [8], "window_size": 7})
