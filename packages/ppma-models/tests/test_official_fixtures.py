"""Semantic fidelity: the authors' code's outputs reproduced through our modules + converter."""

from __future__ import annotations

import json

import numpy as np
import ppma_ops
import pytest
import torch
from ppma_models import PPMA, CrissCrossAttention, PolylineAttention
from ppma_models.convert import convert_from_upstream, from_upstream_kwargs
from ppma_models.rope import FlatRotaryEmbedding

TOL = 1e-5


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_small_config_logits_and_pooled_features(small_fixture, relative_error, backend):
    config, num_classes = from_upstream_kwargs(small_fixture["kwargs"])
    model = PPMA(config, num_classes=num_classes).eval()
    model.load_state_dict(convert_from_upstream(small_fixture["state"], config), strict=True)
    with torch.no_grad(), ppma_ops.use_backend(backend):
        feats = model.forward_features(small_fixture["input"])
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model(small_fixture["input"])
    assert pooled.shape == small_fixture["pooled"].shape
    assert relative_error(pooled, small_fixture["pooled"]) <= TOL
    assert relative_error(logits, small_fixture["logits"]) <= TOL


def _attention_module(reference_dir, kind: str):
    meta = json.loads((reference_dir / f"attention_{kind}.json").read_text())
    with np.load(reference_dir / f"attention_{kind}.npz") as z:
        arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    cls = PolylineAttention if kind == "whole" else CrissCrossAttention
    module = cls(meta["embed_dim"], meta["num_heads"]).eval()
    # Route the module's upstream keys through the model converter as block 0 of stage 0.
    upstream_prefix, our_prefix = "layers.0.blocks.0.retention.", "stages.0.blocks.0.attn."
    upstream = {upstream_prefix + k[6:]: v for k, v in arrays.items() if k.startswith("state/")}
    ours = convert_from_upstream(upstream)
    assert all(k.startswith(our_prefix) for k in ours)
    module.load_state_dict({k[len(our_prefix) :]: v for k, v in ours.items()}, strict=True)
    return module, arrays["input"], arrays["output/y"]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("kind", ["whole", "chunk"])
def test_attention_module_fixture(reference_dir, relative_error, kind, backend):
    module, x, expected = _attention_module(reference_dir, kind)
    _, h, w, _ = x.shape
    assert (h, w) == (7, 9)  # non-square: catches a row/column mix-up
    rotary = FlatRotaryEmbedding(module.head_dim)(h, w, device=x.device, dtype=x.dtype)
    with torch.no_grad(), ppma_ops.use_backend(backend):
        y = module(x, rotary)
    assert relative_error(y, expected) <= TOL


def test_attention_kinds_are_not_interchangeable(reference_dir, relative_error):
    """The fixtures can tell the two attention kinds apart (a guard on the test itself)."""
    module, x, expected = _attention_module(reference_dir, "whole")
    swapped = CrissCrossAttention(module.dim, module.heads)
    swapped.load_state_dict(module.state_dict())
    rotary = FlatRotaryEmbedding(module.head_dim)(7, 9, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        assert relative_error(swapped(x, rotary), expected) > 1e-3
