"""The detector of a run: its description, construction and loading.

A run stores a plain-dict :class:`DetectorSpec` with its checkpoints, so ``eval`` and ``predict``
rebuild exactly the trained model from the weights file alone. That metadata is untrusted input:
types and sizes are checked (the backbone's config with ppma_models' checks of a model file, the
detector settings against :data:`SETTING_LIMITS`), the model is compared with the file's tensors
on the ``meta`` device before anything is allocated, and any problem is a CheckpointError naming
the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from ppma_models.checkpoint import CONFIG_LIMITS, LoadResult, check_dtypes
from ppma_models.checkpoint import CheckpointError as ModelCheckpointError
from ppma_models.detection import DetectionSettings, PPMAMaskRCNN, create_detection_model
from ppma_models.detection_convert import load_detection_checkpoint

from apps.engine.checkpoint import CheckpointError, load_training_state, load_weights
from apps.segment.model import backbone_config_problem

__all__ = [
    "SETTING_LIMITS",
    "DetectorSpec",
    "build_model",
    "load_meta",
    "load_trained",
    "scene_settings",
]

#: Upper bounds on what recorded detector settings may ask for (widths, image sides, counts).
SETTING_LIMITS = {
    "fpn_channels": CONFIG_LIMITS["width"],
    "box_head_width": CONFIG_LIMITS["width"],
    "mask_head_channels": CONFIG_LIMITS["width"],
    "mask_head_convs": 64,
    "min_size": 1 << 14,
    "max_size": 1 << 14,
}


def scene_settings(canvas: int) -> dict[str, Any]:
    """Detector settings for the built-in scenes: small images, small objects, few of them.

    Images keep their size (``canvas``); anchors are 4 × stride (16 px at stride 4, for items
    of 20-40 px); a narrower FPN and heads, and fewer proposals and sampled RoIs than
    mmdetection's COCO settings, since a scene holds 2-4 objects.
    """
    return {
        "min_size": canvas,
        "max_size": canvas,
        "train_resize": False,
        "anchor_scale": 4.0,
        "fpn_channels": 64,
        "box_head_width": 256,
        "mask_head_convs": 2,
        "mask_head_channels": 64,
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 150,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100,
        "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 64,
        "box_detections_per_img": 30,
    }


@dataclass(frozen=True)
class DetectorSpec:
    """Everything that rebuilds a trained detector. Labels 1..num_classes are ``class_names``,
    written to results as ``category_ids`` (the dataset's own ids)."""

    backbone: str
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    settings: dict[str, Any] = field(default_factory=dict)  # DetectionSettings overrides
    backbone_args: dict[str, Any] = field(default_factory=dict)  # PPMAConfig overrides
    drop_path: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def detection_settings(self) -> DetectionSettings:
        return DetectionSettings().replace(**self.settings)

    def to_dict(self) -> dict[str, Any]:
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in self.backbone_args.items()}
        return {
            "backbone": self.backbone,
            "class_names": list(self.class_names),
            "category_ids": list(self.category_ids),
            "settings": self.detection_settings().to_dict(),
            "backbone_args": plain,
            "drop_path": self.drop_path,
        }

    @classmethod
    def from_dict(cls, d: object) -> DetectorSpec:
        """The spec a checkpoint records; CheckpointError (the caller adds the file name)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"the model metadata is not a JSON object: {str(d)[:80]}")
        missing = sorted({"backbone", "class_names", "category_ids"} - set(d))
        if missing:
            raise CheckpointError(f"the model metadata lacks {missing}")
        problem = _spec_problem(d)
        if problem is not None:
            raise CheckpointError(f"invalid model metadata: {problem}")
        args = d.get("backbone_args") or {}
        return cls(
            backbone=d["backbone"],
            class_names=tuple(d["class_names"]),
            category_ids=tuple(d["category_ids"]),
            settings=dict(d.get("settings") or {}),
            backbone_args={k: tuple(v) if isinstance(v, list) else v for k, v in args.items()},
            drop_path=float(d.get("drop_path", 0.0)),
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spec_problem(d: dict) -> str | None:
    names, ids = d["class_names"], d["category_ids"]
    if not isinstance(d["backbone"], str):
        return f"backbone={d['backbone']!r}"
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return "class_names must be a non-empty list of strings"
    if len(names) > CONFIG_LIMITS["classes"]:
        return f"{len(names)} classes (at most {CONFIG_LIMITS['classes']})"
    if not (isinstance(ids, list) and len(ids) == len(names) and all(map(_is_int, ids))):
        return "category_ids must be one integer per class name"
    drop = d.get("drop_path", 0.0)
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 1:
        return f"drop_path={drop!r}"
    settings = d.get("settings") or {}
    if not isinstance(settings, dict):
        return "settings must be a JSON object"
    too_big = [
        k for k, top in SETTING_LIMITS.items() if _is_int(settings.get(k)) and settings[k] > top
    ]
    if too_big:
        return f"settings {too_big} beyond {[SETTING_LIMITS[k] for k in too_big]}"
    try:
        DetectionSettings().replace(**settings)
    except (TypeError, ValueError) as exc:
        return f"settings: {exc}"
    args = d.get("backbone_args") or {}
    if not isinstance(args, dict):
        return "backbone_args must be a JSON object"
    return backbone_config_problem(d["backbone"], args)


def build_model(spec: DetectorSpec, *, pretrained: str | None = None) -> PPMAMaskRCNN:
    """The detector ``spec`` describes; ``pretrained``: a detector or backbone checkpoint
    (see :func:`ppma_models.detection_convert.load_detection_checkpoint`)."""
    model = create_detection_model(
        spec.backbone,
        spec.num_classes,
        backbone_args=spec.backbone_args,
        drop_path_rate=spec.drop_path,
        settings=spec.detection_settings(),
    )
    if pretrained is not None:
        load_detection_checkpoint(model, pretrained, strict=False)
    return model


def _weights_and_meta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if path.suffix == ".pt":
        state = load_training_state(path)
        ema = state.get("ema")
        weights = ema.get("module") if isinstance(ema, dict) and ema else state.get("model")
        meta = state.get("meta") or {}
    else:
        weights, meta = load_weights(path)
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"{path}: holds no state dict of weights")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the run metadata is not a JSON object")
    return weights, meta, path


def load_meta(path: str | Path) -> dict[str, Any]:
    """The run metadata stored with a checkpoint (model spec, data description, ...)."""
    return _weights_and_meta(path)[1]


def _check_weights(spec: DetectorSpec, weights: dict[str, torch.Tensor], path: Path) -> dict:
    """The model's state dict on the ``meta`` device (no memory), once every tensor of the file
    fits it: a recorded model larger than the file is refused before it is allocated."""
    try:
        with torch.device("meta"):
            own = build_model(spec).state_dict()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the metadata describes no valid model: {exc}") from None
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


def load_trained(path: str | Path) -> tuple[PPMAMaskRCNN, DetectorSpec]:
    """Model in eval mode + spec from a run directory (its best.safetensors), a
    ``.safetensors`` weights file or a ``.pt`` training state (EMA weights when present)."""
    weights, meta, path = _weights_and_meta(path)
    if meta.get("app") != "detect" or "model" not in meta:
        raise CheckpointError(f"{path} was not written by the detect app (no detector metadata)")
    try:
        spec = DetectorSpec.from_dict(meta["model"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    own = _check_weights(spec, weights, path)
    try:
        check_dtypes(weights, own, LoadResult(str(path), "detect weights"))
    except ModelCheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    model = build_model(spec)
    model.load_state_dict(weights)
    return model.eval(), spec


def settings_fields() -> list[str]:
    return [f.name for f in fields(DetectionSettings)]
