"""Named model configurations and the ``create_model`` factory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import PPMAConfig
from .model import PPMA

_REGISTRY: dict[str, PPMAConfig] = {}


def register_model(name: str, config: PPMAConfig, *, overwrite: bool = False) -> PPMAConfig:
    """Make ``config`` available to :func:`create_model` under ``name``."""
    if not isinstance(config, PPMAConfig):
        raise TypeError(f"config must be a PPMAConfig, got {type(config).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"model {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = config
    return config


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def get_config(name: str) -> PPMAConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}") from None


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    pretrained: str | Path | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    attention: str = "native",
    drop_path_rate: float | None = None,
    strict: bool = True,
    **overrides: object,
) -> PPMA:
    """Build a registered PPMA model.

    name: see :func:`list_models` (ppma_tiny, ppma_small, ppma_base, ppma_nano).
    pretrained: path to an authors' checkpoint (.pth: classification, or mmseg/mmdet with a
        ``backbone.`` prefix) or one of our safetensors files; loaded with
        :func:`ppma_models.checkpoint.load_checkpoint`. A classifier whose head size differs
        from ``num_classes`` keeps a freshly initialised final layer (fine-tuning).
    features_only / out_indices: dense multi-scale backbone returning NCHW maps.
    attention: "native" or "reference" masked-attention ops.
    drop_path_rate: overrides the config's stochastic-depth rate.
    overrides: any other :class:`PPMAConfig` field (e.g. ``in_chans=1``).
    """
    config = get_config(name)
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    if overrides:
        config = config.replace(**overrides)
    model = PPMA(
        config,
        num_classes=num_classes,
        features_only=features_only,
        out_indices=out_indices,
        attention=attention,
        name=name,
    )
    if pretrained is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, pretrained, strict=strict, reset_mismatched_classifier=True)
    return model


def _stages(**fields: Sequence[object]) -> dict[str, tuple]:
    return {k: tuple(v) for k, v in fields.items()}


# The published models (docs/design.md §2.5 table).
PPMA_TINY = register_model(
    "ppma_tiny",
    PPMAConfig(
        **_stages(
            dims=(64, 128, 256, 512),
            depths=(2, 2, 8, 2),
            heads=(4, 4, 8, 16),
            mlp_ratios=(3, 3, 3, 3),
            attention_kinds="XXVV",
            layer_scale=(False,) * 4,
        ),
        drop_path_rate=0.1,
    ),
)
PPMA_SMALL = register_model(
    "ppma_small",
    PPMAConfig(
        **_stages(
            dims=(64, 128, 256, 512),
            depths=(3, 4, 18, 4),
            heads=(4, 4, 8, 16),
            mlp_ratios=(4, 4, 3, 3),
            attention_kinds="XXXV",
            layer_scale=(False,) * 4,
        ),
        drop_path_rate=0.15,
    ),
)
PPMA_BASE = register_model(
    "ppma_base",
    PPMAConfig(
        **_stages(
            dims=(80, 160, 320, 512),
            depths=(4, 8, 25, 8),
            heads=(5, 5, 10, 16),
            mlp_ratios=(4, 4, 3, 3),
            attention_kinds="XXXV",
            layer_scale=(False, False, True, True),
        ),
        drop_path_rate=0.4,
        layer_scale_init=1e-6,
    ),
)
# Not a published model: a small variant for quick experiments and the apps' tests
# (e.g. 28×28 Fashion-MNIST → 7×7, 4×4, 2×2, 1×1 token grids).
PPMA_NANO = register_model(
    "ppma_nano",
    PPMAConfig(
        **_stages(
            dims=(32, 64, 128, 256),
            depths=(1, 1, 2, 1),
            heads=(2, 2, 4, 8),
            mlp_ratios=(3, 3, 3, 3),
            attention_kinds="XXVV",
            layer_scale=(False,) * 4,
        ),
        drop_path_rate=0.05,
    ),
)
