"""PPMA-T/S/B as timm models (docs/design.md §7.3).

Importing this module — ``ppma_models`` does when timm is installed — registers ``ppma_tiny``,
``ppma_small`` and ``ppma_base`` with timm's model registry::

    >>> model = timm.create_model("ppma_tiny", num_classes=10)
    >>> backbone = timm.create_model("ppma_tiny", features_only=True, out_indices=(1, 2, 3))
    >>> backbone.feature_info.channels(), backbone.feature_info.reduction()
    ([128, 256, 512], [8, 16, 32])
    >>> model = timm.create_model(
    ...     "ppma_tiny", pretrained=True, pretrained_cfg_overlay=dict(file="ppma_tiny_ema.pth"))

The models are :class:`ppma_models.PPMA` instances with our state-dict names; timm's builder
gives them its ``pretrained_cfg`` (from :func:`ppma_models.get_pretrained_cfg`), loads weights
through :func:`checkpoint_filter` (the authors' names converted on the fly), and wraps a
``features_only`` model in its getter wrapper around :meth:`PPMA.forward_intermediates`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .convert import convert_from_upstream, is_upstream_state_dict
from .model import PPMA
from .registry import create_model, get_pretrained_cfg

__all__ = ["TIMM_MODELS", "checkpoint_filter", "timm_pretrained_cfg"]

#: The models registered with timm: the published architectures.
TIMM_MODELS = ("ppma_tiny", "ppma_small", "ppma_base")
#: timm's pretrained tag of the authors' ImageNet-1K weights.
TAG = "in1k"

#: Settings that timm's PretrainedCfg holds under the same names.
_SAME_NAMES = ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "license")


def timm_pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained cfg of ``name``, from :func:`ppma_models.get_pretrained_cfg`.

    Input size, normalisation, crop, interpolation, classes and licence keep their names.
    ``url`` is where the authors publish their weights (a repository page, not a file), so it
    becomes timm's ``origin_url``: ``pretrained=True`` then needs a file
    (``pretrained_cfg_overlay=dict(file=...)``) instead of trying to download the page. The
    authors' model names go to ``notes``; ``first_conv`` and ``classifier`` tell timm where to
    adapt a checkpoint to other input channels or classes.
    """
    settings = get_pretrained_cfg(name)
    cfg = {k: v for k, v in dataclasses.asdict(settings).items() if k in _SAME_NAMES}
    if settings.url:
        cfg["origin_url"] = settings.url
    if settings.upstream_names:
        cfg["notes"] = (f"the authors' model name: {', '.join(settings.upstream_names)}",)
    return {**cfg, "first_conv": "stem.conv1", "classifier": "head.fc"}


def checkpoint_filter(state_dict: Mapping[str, torch.Tensor], model: PPMA) -> dict:
    """A checkpoint's state dict in ``model``'s names, for timm's loader.

    mmseg/mmdet files keep only their ``backbone.`` entries; the authors' names are converted
    (:func:`ppma_models.convert.convert_from_upstream`); per-stage output norms the model
    does not have are dropped (a classifier loading a dense backbone's file).
    """
    state = dict(state_dict)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if is_upstream_state_dict(state):
        state = convert_from_upstream(state, model.config)
    own = model.state_dict()
    return {k: v for k, v in state.items() if not k.startswith("out_norms.") or k in own}


def _build(name: str, **kwargs: Any) -> PPMA:
    """ppma_models.create_model plus the attributes timm's tools read from every model."""
    model = create_model(name, **kwargs)
    if not hasattr(model, "num_features"):  # channels of forward_features' output
        model.num_features = model.config.dims[-1]
    if not hasattr(model, "head_hidden_size"):  # width of forward_head(pre_logits=True)
        model.head_hidden_size = model.config.head_hidden
    return model


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> PPMA:
    return build_model_with_cfg(
        partial(_build, name),
        name,
        pretrained,
        pretrained_filter_fn=checkpoint_filter,
        feature_cfg={"out_indices": (0, 1, 2, 3), "feature_cls": "getter"},
        **kwargs,
    )


default_cfgs = generate_default_cfgs({f"{n}.{TAG}": timm_pretrained_cfg(n) for n in TIMM_MODELS})


@register_model
def ppma_tiny(pretrained: bool = False, **kwargs: Any) -> PPMA:
    """PPMA-T (docs/design.md §2.5)."""
    return _create("ppma_tiny", pretrained, **kwargs)


@register_model
def ppma_small(pretrained: bool = False, **kwargs: Any) -> PPMA:
    """PPMA-S (docs/design.md §2.5)."""
    return _create("ppma_small", pretrained, **kwargs)


@register_model
def ppma_base(pretrained: bool = False, **kwargs: Any) -> PPMA:
    """PPMA-B (docs/design.md §2.5)."""
    return _create("ppma_base", pretrained, **kwargs)
