"""The segmentation model of a run: its description, construction and loading.

A run stores a plain-dict :class:`ModelSpec` in its checkpoints' metadata, so ``eval`` and
``predict`` rebuild exactly the trained architecture from the weights file alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from ppma_models.registry import get_config
from ppma_models.segmentation import SegmentationModel, create_segmentation_model

from apps.engine.checkpoint import CheckpointError, load_training_state, load_weights

__all__ = ["ModelSpec", "build_model", "count_parameters", "load_meta", "load_trained"]


@dataclass(frozen=True)
class ModelSpec:
    backbone: str
    num_classes: int
    class_names: tuple[str, ...]
    channels: int = 64
    aux_channels: int = 32  # 0: no auxiliary head
    ignore_index: int = 255
    crop: int = 64  # training crop: the default sliding window for larger images
    drop_path: float = 0.0
    dropout: float = 0.1  # Dropout2d before each head's classifier (MMSeg's default)
    fuse_kernel: int = 3  # UPerHead's fpn_bottleneck kernel (UPerNet: 3)
    # PPMAConfig overrides of the registered backbone (--model-arg), e.g. {"depths": (1, 2, 2)}
    backbone_args: dict[str, Any] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(get_config(self.backbone).replace(**self.backbone_args).dims)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["backbone_args"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.backbone_args.items()
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        missing = {"backbone", "num_classes", "class_names"} - set(d)
        if missing:
            raise CheckpointError(f"checkpoint metadata lacks {sorted(missing)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["class_names"] = tuple(kwargs["class_names"])
        kwargs["backbone_args"] = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in (kwargs.get("backbone_args") or {}).items()
        }
        return cls(**kwargs)


def build_model(
    spec: ModelSpec, *, attention: str = "native", pretrained: str | None = None
) -> SegmentationModel:
    """UPerNet on ``spec.backbone`` over all its stages (the auxiliary FCN head on the
    penultimate one, as MMSeg's on stage 3 of 4); ``pretrained`` loads backbone weights."""
    stages = spec.num_stages
    kwargs: dict[str, Any] = {
        "attention": attention,
        "drop_path_rate": spec.drop_path,
        "out_indices": tuple(range(stages)),
        **spec.backbone_args,
    }
    if pretrained is not None:
        kwargs.update(pretrained=pretrained, strict=False)
    return create_segmentation_model(
        spec.backbone,
        spec.num_classes,
        channels=spec.channels,
        aux_channels=spec.aux_channels or None,
        aux_in_index=max(stages - 2, 0),
        dropout=spec.dropout,
        fuse_kernel_size=spec.fuse_kernel,
        **kwargs,
    )


def _weights_and_meta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if path.suffix == ".pt":
        state = load_training_state(path)
        weights = state["ema"]["module"] if state.get("ema") else state["model"]
        return weights, state.get("meta") or {}, path
    weights, meta = load_weights(path)
    return weights, meta, path


def load_meta(path: str | Path) -> dict[str, Any]:
    """The run metadata stored with a checkpoint (model spec, data description, ...)."""
    return _weights_and_meta(path)[1]


def load_trained(
    path: str | Path, *, attention: str = "native"
) -> tuple[SegmentationModel, ModelSpec]:
    """Model in eval mode + spec from a run directory (its best.safetensors), a ``.safetensors``
    weights file or a ``.pt`` training state (EMA weights when present)."""
    weights, meta, path = _weights_and_meta(path)
    if "model" not in meta:
        raise CheckpointError(f"{path} was not written by the segment app (no model metadata)")
    spec = ModelSpec.from_dict(meta["model"])
    model = build_model(spec, attention=attention)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded model: {exc}") from exc
    return model.eval(), spec


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
