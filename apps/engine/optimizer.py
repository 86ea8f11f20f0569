"""AdamW with the usual weight-decay exemptions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["build_adamw", "weight_decay_groups"]

# Mamba2-style decay parameters of the PPMA attention (docs/design.md §2.1) take no weight decay.
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
    lr_scales: Mapping[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`weight_decay_groups`.

    lr_scales: parameter-name prefix → lr multiplier, the first matching prefix wins (e.g.
    ``{"backbone.": 0.1}`` fine-tunes a pretrained backbone ten times slower than a fresh
    head, like MMSegmentation's ``lr_mult``). Schedules scale every group's lr alike.

    The fused kernel where every parameter lives on a device that has one (CPU, CUDA): the
    default for-loop update costs ~10 % of a small model's CPU training step.
    """
    scales = dict(lr_scales or {})
    for prefix, scale in scales.items():
        if not scale > 0:
            raise ValueError(f"lr scale for {prefix!r} must be > 0, got {scale}")
    groups = weight_decay_groups(model, weight_decay)
    if scales:
        name_of = {id(p): n for n, p in model.named_parameters()}

        def scale_of(param: torch.nn.Parameter) -> float:
            name = name_of[id(param)]
            return next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)

        split = []
        for group in groups:
            by_scale: dict[float, list] = {}
            for param in group["params"]:
                by_scale.setdefault(scale_of(param), []).append(param)
            # Unscaled parameters first: the first group's lr is the one logged.
            for scale, params in sorted(by_scale.items(), key=lambda item: item[0] != 1.0):
                split.append({**group, "params": params, "lr": lr * scale})
        groups = split
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"} or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
