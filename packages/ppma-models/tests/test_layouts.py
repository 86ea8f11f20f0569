"""Memory layouts chosen to spare copies, and the fused forms that replace plain ones.

Each fused form is checked against the plain formula it replaces (the oracle), and each
layout against what the next operation reads.
"""

from __future__ import annotations

import pytest
import torch
from ppma_models.decay import DecayField
from ppma_models.drop_path import DropPath
from ppma_models.rope import FlatRotaryEmbedding, apply_rotary, rotate_every_two
from ppma_models.testing import seeded_model


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, h, w, c = t.shape
    return t.view(b, h, w, heads, c // heads).permute(0, 3, 1, 2, 4)


def _real_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """The upstream real-valued formula x·cos + rotate_every_two(x)·sin (the oracle)."""
    cos = rotation.real.repeat_interleave(2, dim=-1)
    sin = rotation.imag.repeat_interleave(2, dim=-1)
    return x * cos + rotate_every_two(x) * sin


def test_rotary_gradient_lands_in_the_input_layout():
    torch.manual_seed(0)
    heads, d = 3, 8
    proj = torch.randn(2, 5, 7, heads * d, dtype=torch.float64, requires_grad=True)
    rotation = FlatRotaryEmbedding(d)(5, 7, device=proj.device, dtype=proj.dtype)
    grad = torch.randn(2, heads, 5, 7, d, dtype=torch.float64)

    x = _split_heads(proj, heads)
    y = apply_rotary(x, rotation)
    assert y.is_contiguous()  # the layout the attention ops read
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert grad_x.stride() == x.stride()  # so the projection's gradient is a plain view
    (got,) = torch.autograd.grad(apply_rotary(_split_heads(proj, heads), rotation), proj, grad)
    (expected,) = torch.autograd.grad(_real_rotary(_split_heads(proj, heads), rotation), proj, grad)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_rotary_gradient_of_an_overlapping_input():
    # A broadcast input cannot lend its layout to the gradient: a fresh tensor is used.
    torch.manual_seed(0)
    rotation = FlatRotaryEmbedding(4)(2, 3, device=torch.device("cpu"), dtype=torch.float64)
    base = torch.randn(1, 1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 1, 2, 3, 4, dtype=torch.float64)
    (got,) = torch.autograd.grad(apply_rotary(base.expand(5, 1, 2, 3, 4), rotation), base, grad)
    (expected,) = torch.autograd.grad(
        _real_rotary(base.expand(5, 1, 2, 3, 4), rotation), base, grad
    )
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_decay_field_returns_contiguous_log_decays():
    field = DecayField(12, 3)
    log_alpha, log_beta = field(torch.randn(2, 4, 5, 12))
    assert log_alpha.shape == log_beta.shape == (2, 3, 4, 5)
    assert log_alpha.is_contiguous() and log_beta.is_contiguous()


@pytest.mark.parametrize("layer_scale", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_add_branch_equals_residual_plus_drop_path(layer_scale, training):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    y = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    gamma = torch.randn(5, dtype=torch.float64) if layer_scale else None
    drop = DropPath(0.5).train(training)

    torch.manual_seed(1)
    fused = drop.add_branch(x, y, gamma)
    torch.manual_seed(1)
    # Oracle: the textbook form, timm's drop_path with the same per-sample draws.
    branch = y if gamma is None else gamma * y
    if training:
        keep = torch.empty(6, 1, 1, 1, dtype=torch.float64).bernoulli_(0.5)
        branch = branch * keep / 0.5
    assert torch.allclose(fused, x + branch, rtol=1e-14, atol=1e-14)

    torch.manual_seed(1)
    inplace = drop.add_branch(x.clone(), y, gamma, inplace=True)
    assert torch.equal(inplace, fused)


def test_state_dict_tensors_are_contiguous_for_any_safetensors_writer():
    # Parameters kept in another memory layout make safetensors writers (timm's save_for_hf,
    # huggingface_hub) refuse the state dict.
    model = seeded_model("ppma_nano")
    assert all(t.is_contiguous() for t in model.state_dict().values())
