"""The segmentation model of a run: its description, construction and loading.

A run stores a plain-dict :class:`ModelSpec` in its checkpoints' metadata, so ``eval`` and
``predict`` rebuild exactly the trained architecture from the weights file alone. That
metadata is untrusted input: its types and sizes are checked (the backbone's config with
ppma_models' checks of a model file), the model is compared with the file's tensors on the
``meta`` device before it is allocated, and any problem is a CheckpointError naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from ppma_models.checkpoint import CONFIG_LIMITS, LoadResult, check_dtypes, config_problem
from ppma_models.checkpoint import CheckpointError as ModelCheckpointError
from ppma_models.config import PPMAConfig
from ppma_models.registry import get_config
from ppma_models.segmentation import SegmentationModel, create_segmentation_model

from apps.engine.checkpoint import CheckpointError, load_training_state, load_weights

__all__ = [
    "ModelSpec",
    "backbone_config_problem",
    "build_model",
    "count_parameters",
    "load_meta",
    "load_trained",
]


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
            raise CheckpointError(f"the model metadata is not a JSON object: {_short(d)}")
        known = {f.name for f in fields(cls)}
        missing = {"backbone", "num_classes", "class_names"} - set(d)
        if missing:
            raise CheckpointError(f"checkpoint metadata lacks {sorted(missing)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        bad = [f"{k}={_short(v)}" for k, v in kwargs.items() if not _SPEC_CHECKS[k](v)]
        if bad:
            raise CheckpointError(f"invalid model metadata value(s): {', '.join(bad)}")
        if len(kwargs["class_names"]) != kwargs["num_classes"]:
            raise CheckpointError(
                f"the model metadata lists {len(kwargs['class_names'])} class names for "
                f"{kwargs['num_classes']} classes"
            )
        args = kwargs.get("backbone_args") or {}
        problem = backbone_config_problem(kwargs["backbone"], args)
        if problem is not None:
            raise CheckpointError(f"the recorded backbone is not usable: {problem}")
        kwargs["class_names"] = tuple(kwargs["class_names"])
        kwargs["backbone_args"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in args.items()
        }
        return cls(**kwargs)


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_rate(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Each ModelSpec field's check: JSON gives no types, and the sizes bound what gets allocated.
_WIDTH = CONFIG_LIMITS["width"]
_SPEC_CHECKS: dict[str, Callable[[object], bool]] = {
    "backbone": lambda v: isinstance(v, str),
    "num_classes": lambda v: _is_int(v, 1, CONFIG_LIMITS["classes"]),
    "class_names": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
    "channels": lambda v: _is_int(v, 1, _WIDTH),
    "aux_channels": lambda v: _is_int(v, 0, _WIDTH),
    "ignore_index": lambda v: _is_int(v, 0, 65535),
    "crop": lambda v: _is_int(v, 1, 1 << 14),
    "drop_path": _is_rate,
    "dropout": _is_rate,
    "fuse_kernel": lambda v: _is_int(v, 1, 31) and v % 2 == 1,
    "backbone_args": lambda v: v is None or isinstance(v, dict),
}


def backbone_config_problem(backbone: str, overrides: dict[str, Any]) -> str | None:
    """What makes ``backbone`` with ``overrides`` (``--model-arg``) unusable, or None.

    The overrides are checked as a model file's config is (JSON types, the library's
    :data:`CONFIG_LIMITS`) before PPMAConfig does arithmetic with them.
    """
    try:
        base = get_config(backbone)
    except ValueError as exc:
        return str(exc)
    unknown = sorted(set(overrides) - {f.name for f in fields(base)})
    if unknown:
        return f"unknown PPMAConfig field(s) {unknown}"
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    data = {**base.to_dict(), **plain}
    small = [k for k in ("dims", "head_hidden") if _any_below_one(data.get(k))]
    if small:
        return f"{small[0]} must be >= 1, got {data[small[0]]}"
    problem = config_problem(data)
    if problem is None:
        try:
            PPMAConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            problem = str(exc)
    return problem


def _any_below_one(value: object) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values)


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


def _state_weights(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a training state when present, else its model weights."""
    ema = state.get("ema")
    weights = ema.get("module") if isinstance(ema, dict) and ema else state.get("model")
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"{path}: the training state holds no state dict of weights")
    return weights


def _weights_and_meta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if path.suffix == ".pt":
        state = load_training_state(path)
        weights, meta = _state_weights(state, path), state.get("meta") or {}
    else:
        weights, meta = load_weights(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the run metadata is not a JSON object")
    return weights, meta, path


def load_meta(path: str | Path) -> dict[str, Any]:
    """The run metadata stored with a checkpoint (model spec, data description, ...)."""
    return _weights_and_meta(path)[1]


def _check_weights(
    spec: ModelSpec, weights: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """The model's state dict on the ``meta`` device (no memory), once every tensor of the
    file fits it in name and shape: a recorded model larger than the file is refused before
    it is allocated."""
    with torch.device("meta"):
        own = build_model(spec, attention="reference").state_dict()
    wrong = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in weights and weights[k].shape != v.shape
    ]
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the recorded model: {len(wrong)} shape(s) differ "
            f"{wrong[:4]}, {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}"
        )
    return own


def load_trained(
    path: str | Path, *, attention: str = "native"
) -> tuple[SegmentationModel, ModelSpec]:
    """Model in eval mode + spec from a run directory (its best.safetensors), a ``.safetensors``
    weights file or a ``.pt`` training state (EMA weights when present)."""
    weights, meta, path = _weights_and_meta(path)
    if "model" not in meta:
        raise CheckpointError(f"{path} was not written by the segment app (no model metadata)")
    try:
        spec = ModelSpec.from_dict(meta["model"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    own = _check_weights(spec, weights, path)
    try:
        # load_state_dict would cast integer data into float weights without a word.
        check_dtypes(weights, own, LoadResult(str(path), "segment weights"))
    except ModelCheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    model = build_model(spec, attention=attention)
    model.load_state_dict(weights)
    return model.eval(), spec


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
