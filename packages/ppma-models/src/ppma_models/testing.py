"""Helpers for the tests of ppma_models and of the applications built on it.

* :data:`TINY_CONFIG`: a two-stage PPMA that builds and runs in milliseconds;
* :func:`seeded_model`: a model with reproducible weights;
* :func:`perturbed`: a state dict with noise added, e.g. to tell ``model`` from
  ``model_ema`` weights apart;
* :func:`write_authors_checkpoint`: a classification file in the authors' layout (their
  published checkpoints cannot be downloaded in tests);
* :func:`safetensors_contents`, :func:`rewrite_safetensors`: read a safetensors file whole,
  and write a variant of it with some tensors or metadata entries changed (damaged-file tests);
* :func:`relative_error`: max |a − b| / max |b|, the measure of the fidelity tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import PPMAConfig
from .convert import convert_to_upstream, is_upstream_state_dict
from .model import PPMA
from .registry import create_model

__all__ = [
    "TINY_CONFIG",
    "perturbed",
    "relative_error",
    "rewrite_safetensors",
    "safetensors_contents",
    "seeded_model",
    "write_authors_checkpoint",
]

#: Two stages (8 and 16 channels, one block each: criss-cross, then vanilla) and a 16-wide
#: classifier projection; pass it to ``PPMA`` or its fields to ``create_model`` as overrides.
TINY_CONFIG = PPMAConfig(
    dims=(8, 16),
    depths=(1, 1),
    heads=(2, 2),
    mlp_ratios=(2, 2),
    attention_kinds=("X", "V"),
    layer_scale=(False, False),
    head_hidden=16,
)


def seeded_model(arch: str | PPMAConfig, *, seed: int = 0, **kwargs: object) -> PPMA:
    """``torch.manual_seed(seed)``, then ``create_model(arch, **kwargs)`` for a registered name
    or ``PPMA(arch, **kwargs)`` for a config. The global generator continues from there, so
    inputs drawn next are reproducible too."""
    torch.manual_seed(seed)
    if isinstance(arch, PPMAConfig):
        return PPMA(arch, **kwargs)
    return create_model(arch, **kwargs)


def perturbed(
    state: Mapping[str, torch.Tensor], *, seed: int = 0, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with Gaussian noise of std ``scale`` on every float tensor except
    the authors' constant rotary buffers (``Relpos.angle``), which must stay exact."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=gen)
        if v.is_floating_point() and "angle" not in k
        else v
        for k, v in state.items()
    }


def _upstream(weights: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    return state if is_upstream_state_dict(state) else convert_to_upstream(state)


def write_authors_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, torch.Tensor],
    ema: nn.Module | Mapping[str, torch.Tensor] | None = None,
    *,
    upstream_name: str,
    epoch: int = 3,
) -> Path:
    """Write a classification checkpoint as the authors' training script saves it.

    The file is ``torch.save`` of ``{"model", "model_ema", "optimizer", "lr_scheduler",
    "epoch", "args"}`` with the weights in the authors' key layout (modules and state dicts
    in our layout are converted) and ``args`` an ``argparse.Namespace`` whose ``model`` is
    ``upstream_name`` (e.g. "PPMAViT_T"). ema defaults to the same weights as model.
    """
    args = argparse.Namespace(
        model=upstream_name, lr=1e-3, input_size=224, drop_path=0.1, data_path=None
    )
    raw = _upstream(model)
    torch.save(
        {
            "model": raw,
            "model_ema": raw if ema is None else _upstream(ema),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "lr_scheduler": {"last_epoch": epoch},
            "epoch": epoch,
            "args": args,
        },
        path,
    )
    return Path(path)


def safetensors_contents(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def rewrite_safetensors(
    source: str | Path,
    path: str | Path,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    **metadata: str | None,
) -> Path:
    """Write ``source`` again as ``path`` with the given tensors replaced or added and the
    given metadata entries set (``None`` removes an entry); returns ``path``."""
    state, meta = safetensors_contents(source)
    state.update(tensors or {})
    for key, value in metadata.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(state, str(path), metadata=meta)
    return Path(path)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
