"""The segmentation model of a run: its description, construction and loading.

A run stores a plain-dict :class:`ModelSpec` as the model description of its run spec
(:mod:`apps.engine.runspec`), so ``eval`` and ``predict`` know the class names, the ignore
index and the training crop. The weights files are ppma_models' safetensors layout, which
``ppma_models.load_model`` rebuilds from the file alone; files written before (a state dict
with the run's meta as JSON, :func:`apps.engine.checkpoint.save_weights`) are rebuilt from the
ModelSpec. That metadata is untrusted input: its types and sizes are checked (the backbone's
config with ppma_models' checks of a model file), the model is compared with the file's
tensors on the ``meta`` device before it is allocated, and any problem is a
``ppma_models.CheckpointError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from ppma_models import CheckpointError, SegmentationModel, create_segmentation_model
from ppma_models.checkpoint import CONFIG_LIMITS
from ppma_models.registry import get_config

from apps.engine.model_args import overrides_problem
from apps.engine.runspec import RUN_FORMAT, RunSpec, is_run_spec
from apps.engine.values import is_int, is_rate, short
from apps.engine.weights import load_run as load_app_run

__all__ = [
    "APP",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "load_meta",
    "load_run",
    "load_trained",
    "read_run_spec",
]

APP = "segment"


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
    def from_dict(cls, d: object) -> ModelSpec:
        """The spec a checkpoint records; CheckpointError (without the file name, which the
        caller adds) for missing fields or values of the wrong type or size."""
        if not isinstance(d, dict):
            raise CheckpointError(f"the model metadata is not a JSON object: {short(d)}")
        known = {f.name for f in fields(cls)}
        missing = {"backbone", "num_classes", "class_names"} - set(d)
        if missing:
            raise CheckpointError(f"checkpoint metadata lacks {sorted(missing)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        bad = [f"{k}={short(v)}" for k, v in kwargs.items() if not _SPEC_CHECKS[k](v)]
        if bad:
            raise CheckpointError(f"invalid model metadata value(s): {', '.join(bad)}")
        if len(kwargs["class_names"]) != kwargs["num_classes"]:
            raise CheckpointError(
                f"the model metadata lists {len(kwargs['class_names'])} class names for "
                f"{kwargs['num_classes']} classes"
            )
        args = kwargs.get("backbone_args") or {}
        problem = overrides_problem(kwargs["backbone"], args)
        if problem is not None:
            raise CheckpointError(f"the recorded backbone is not usable: {problem}")
        kwargs["class_names"] = tuple(kwargs["class_names"])
        kwargs["backbone_args"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in args.items()
        }
        return cls(**kwargs)


# Each ModelSpec field's check: JSON gives no types, and the sizes bound what gets allocated.
_WIDTH = CONFIG_LIMITS["width"]
_SPEC_CHECKS: dict[str, Callable[[object], bool]] = {
    "backbone": lambda v: isinstance(v, str),
    "num_classes": lambda v: is_int(v, 1, CONFIG_LIMITS["classes"]),
    "class_names": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
    "channels": lambda v: is_int(v, 1, _WIDTH),
    "aux_channels": lambda v: is_int(v, 0, _WIDTH),
    "ignore_index": lambda v: is_int(v, 0, 65535),
    "crop": lambda v: is_int(v, 1, 1 << 14),
    "drop_path": is_rate,
    "dropout": is_rate,
    "fuse_kernel": lambda v: is_int(v, 1, 31) and v % 2 == 1,
    "backbone_args": lambda v: v is None or isinstance(v, dict),
}


def build_model(spec: ModelSpec, *, pretrained: str | None = None) -> SegmentationModel:
    """UPerNet on ``spec.backbone`` over all its stages (the auxiliary FCN head on the
    penultimate one, as MMSeg's on stage 3 of 4); ``pretrained`` loads backbone weights."""
    stages = spec.num_stages
    kwargs: dict[str, Any] = {
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


def read_run_spec(meta: object, path: Path) -> RunSpec:
    """The run spec of a segment checkpoint's meta; runs from before run specs stored
    ``{"app": "segment", "model": ..., "data": ...}`` without a recipe."""
    if isinstance(meta, dict) and not is_run_spec(meta) and "model" in meta:
        data = meta.get("data", {})  # runs that predate folders recorded no data: scenes
        meta = {"format": RUN_FORMAT, "app": APP, "recipe": None, "resolved_from": {},
                "model": meta["model"], "data": data}  # fmt: skip
    if not is_run_spec(meta) or meta.get("app") != APP:
        raise CheckpointError(f"{path} was not written by the segment app (no model metadata)")
    return RunSpec.from_meta(meta, str(path))


def _stored_problem(model: torch.nn.Module, spec: ModelSpec) -> str | None:
    if isinstance(model, SegmentationModel) and model.num_classes == spec.num_classes:
        return None
    return f"the stored model is not the recorded {spec.num_classes}-class segmentation model"


def load_run(path: str | Path) -> tuple[SegmentationModel, RunSpec]:
    """The model (in eval mode) and the run spec of a run directory (its best.safetensors),
    a ``.safetensors`` weights file or a ``.pt`` training state (EMA weights when present)."""
    return load_app_run(
        path, app=APP, read_run_spec=read_run_spec, parse_spec=ModelSpec.from_dict,
        build=build_model, stored_problem=_stored_problem,
    )  # fmt: skip


def load_meta(path: str | Path) -> dict[str, Any]:
    """The run spec stored with a checkpoint, as the dict it is stored as."""
    return load_run(path)[1].to_meta()


def load_trained(path: str | Path) -> tuple[SegmentationModel, ModelSpec]:
    """Model in eval mode + spec from a run directory (its best.safetensors), a ``.safetensors``
    weights file or a ``.pt`` training state (EMA weights when present)."""
    model, run = load_run(path)
    return model, ModelSpec.from_dict(run.model)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
