"""Named model configurations, their pretrained settings, and the ``create_model`` factory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import PPMAConfig
from .model import PPMA
from .pretrained import AUTHORS_REPOSITORY, PretrainedCfg

# name -> (architecture, settings of its pretrained weights)
_REGISTRY: dict[str, tuple[PPMAConfig, PretrainedCfg]] = {}


def register_model(
    name: str,
    config: PPMAConfig,
    *,
    pretrained_cfg: PretrainedCfg | None = None,
    overwrite: bool = False,
) -> PPMAConfig:
    """Make ``config`` available to :func:`create_model` under ``name``.

    pretrained_cfg: how the model's weights expect their input (default:
    :meth:`PretrainedCfg.for_channels` of ``config.in_chans``, no published weights). Its
    ``upstream_names`` let :func:`ppma_models.load_model` recognise the authors' files.
    """
    if not isinstance(config, PPMAConfig):
        raise TypeError(f"config must be a PPMAConfig, got {type(config).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"model {name!r} is already registered (pass overwrite=True)")
    if pretrained_cfg is None:
        pretrained_cfg = PretrainedCfg.for_channels(config.in_chans)
    if not isinstance(pretrained_cfg, PretrainedCfg):
        raise TypeError(f"pretrained_cfg must be a PretrainedCfg, got {type(pretrained_cfg)}")
    if pretrained_cfg.input_size[0] != config.in_chans:
        raise ValueError(
            f"pretrained_cfg.input_size has {pretrained_cfg.input_size[0]} channels but the "
            f"config has in_chans={config.in_chans}"
        )
    for upstream in pretrained_cfg.upstream_names:
        owner = model_for_upstream_name(upstream)
        if owner not in (None, name):
            raise ValueError(f"upstream name {upstream!r} already belongs to model {owner!r}")
    _REGISTRY[name] = (config, pretrained_cfg)
    return config


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[PPMAConfig, PretrainedCfg]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}") from None


def get_config(name: str) -> PPMAConfig:
    """The architecture registered under ``name``."""
    return _entry(name)[0]


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    """Input size, normalisation, crop, licence and provenance of ``name``'s weights."""
    return _entry(name)[1]


def model_for_upstream_name(upstream_name: str) -> str | None:
    """The registered name whose pretrained settings list ``upstream_name`` (the authors'
    ``args.model``, e.g. "PPMAViT_T"), or None."""
    for name, (_, cfg) in _REGISTRY.items():
        if upstream_name in cfg.upstream_names:
            return name
    return None


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    pretrained: str | Path | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
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
    features_only / out_indices: dense multi-scale backbone returning NCHW maps of the
        ``out_indices`` stages (default: all).
    drop_path_rate: overrides the config's stochastic-depth rate.
    overrides: any other :class:`PPMAConfig` field (e.g. ``in_chans=1``).

    Which implementation runs the ops is ppma_ops' setting (``ppma_ops.use_backend``).
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
        name=name,
    )
    if pretrained is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, pretrained, strict=strict, reset_mismatched_classifier=True)
    return model


def _stages(**fields: Sequence[object]) -> dict[str, tuple]:
    return {k: tuple(v) for k, v in fields.items()}


def _authors_weights(upstream_name: str) -> PretrainedCfg:
    """The authors' ImageNet-1K classifiers: 224² RGB crops normalised with the ImageNet
    statistics; evaluation resizes the shorter side to 256 with bicubic filtering and takes
    the centre 224² (crop_pct 0.875), as in their classification code."""
    return PretrainedCfg(
        license="Apache-2.0", upstream_names=(upstream_name,), url=AUTHORS_REPOSITORY
    )


# The published models (docs/design.md §2.5 table; their weights §3).
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
    pretrained_cfg=_authors_weights("PPMAViT_T"),
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
    pretrained_cfg=_authors_weights("PPMAViT_S"),
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
    pretrained_cfg=_authors_weights("PPMAViT_B"),
)
# Not a published model (no weights, default pretrained settings): a small variant for quick
# experiments and the apps' tests (e.g. 28×28 Fashion-MNIST → 7×7, 4×4, 2×2, 1×1 token grids).
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
