"""AdamW with the usual weight-decay exemptions."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["build_adamw", "weight_decay_groups"]

# Mamba2-style decay parameters of the PPMA attention (DESIGN §2.1) take no weight decay.
NO_DECAY_NAMES = ("A_log", "dt_bias")


def weight_decay_groups(
    model: torch.nn.Module, weight_decay: float, no_decay_names: Iterable[str] = NO_DECAY_NAMES
) -> list[dict]:
    """Two param groups: decayed (matrices, conv kernels) and not decayed.

    Not decayed: 1-D parameters (biases, norm weights, layer scales), names ending in one of
    ``no_decay_names``, and anything the model lists in ``no_weight_decay()`` (timm convention).
    """
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = tuple(no_decay_names)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or leaf in names or name in extra or leaf in extra:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over :func:`weight_decay_groups`.

    The fused kernel where every parameter lives on a device that has one (CPU, CUDA): the
    default for-loop update costs ~10 % of a small model's CPU training step.
    """
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"} or None
    return torch.optim.AdamW(
        weight_decay_groups(model, weight_decay), lr=lr, betas=betas, fused=fused
    )
