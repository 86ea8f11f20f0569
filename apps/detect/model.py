"""The detector of a run: its description, construction and loading.

A run stores a plain-dict :class:`DetectorSpec` as the model description of its run spec
(:mod:`apps.engine.runspec`), so ``eval`` and ``predict`` know the class names and the
dataset's category ids. The weights files are ppma_models' safetensors layout, which
``ppma_models.load_model`` rebuilds from the file alone (the detector's settings ride in its
metadata); files written before (a state dict with the run's meta as JSON,
:func:`apps.engine.checkpoint.save_weights`) are rebuilt from the DetectorSpec. That metadata
is untrusted input: types and sizes are checked (the backbone's config and the detector
settings with ppma_models' checks of a model file), the model is compared with the file's
tensors on the ``meta`` device before it is allocated, and any problem is a
``ppma_models.CheckpointError`` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ppma_models import CheckpointError
from ppma_models.checkpoint import CONFIG_LIMITS, detection_problem
from ppma_models.detection import DetectionSettings, PPMAMaskRCNN, create_detection_model
from ppma_models.detection_convert import load_detection_checkpoint

from apps.engine.model_args import overrides_problem
from apps.engine.runspec import RUN_FORMAT, RunSpec, is_run_spec
from apps.engine.values import is_int, is_rate, short
from apps.engine.weights import load_run as load_app_run

__all__ = [
    "APP",
    "DetectorSpec",
    "build_model",
    "load_run",
    "load_trained",
    "read_run_spec",
    "scene_settings",
]

APP = "detect"


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
            raise CheckpointError(f"the model metadata is not a JSON object: {short(d)}")
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


def _spec_problem(d: dict) -> str | None:
    names, ids = d["class_names"], d["category_ids"]
    if not isinstance(d["backbone"], str):
        return f"backbone={short(d['backbone'])}"
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return "class_names must be a non-empty list of strings"
    if len(names) > CONFIG_LIMITS["classes"]:
        return f"{len(names)} classes (at most {CONFIG_LIMITS['classes']})"
    if not (isinstance(ids, list) and len(ids) == len(names) and all(map(is_int, ids))):
        return "category_ids must be one integer per class name"
    if not is_rate(d.get("drop_path", 0.0)):
        return f"drop_path={short(d.get('drop_path'))}"
    settings = d.get("settings") or {}
    if not isinstance(settings, dict):
        return "settings must be a JSON object"
    # Recorded settings are complete; a partial dict is completed by the defaults.
    problem = detection_problem({**DetectionSettings().to_dict(), **settings})
    if problem is not None:
        return f"settings: {problem}"
    args = d.get("backbone_args") or {}
    if not isinstance(args, dict):
        return "backbone_args must be a JSON object"
    return overrides_problem(d["backbone"], args)


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


def read_run_spec(meta: object, path: Path) -> RunSpec:
    """The run spec of a detect checkpoint's meta; runs from before run specs stored
    ``{"app": "detect", "model": ..., "data": ...}`` without a recipe."""
    if isinstance(meta, dict) and not is_run_spec(meta) and meta.get("app") == APP:
        meta = {"format": RUN_FORMAT, "app": APP, "recipe": None, "resolved_from": {},
                "model": meta.get("model"), "data": meta.get("data", {})}  # fmt: skip
    if not is_run_spec(meta) or meta.get("app") != APP:
        raise CheckpointError(f"{path} was not written by the detect app (no detector metadata)")
    return RunSpec.from_meta(meta, str(path))


def _stored_problem(model: torch.nn.Module, spec: DetectorSpec) -> str | None:
    if (
        isinstance(model, PPMAMaskRCNN)
        and model.num_classes == spec.num_classes
        and model.settings == spec.detection_settings()
    ):
        return None
    return f"the stored model is not the recorded {spec.num_classes}-class detector"


def load_run(path: str | Path) -> tuple[PPMAMaskRCNN, RunSpec]:
    """The detector (in eval mode) and the run spec of a run directory (its
    best.safetensors), a ``.safetensors`` weights file or a ``.pt`` training state (EMA
    weights when present)."""
    return load_app_run(
        path, app=APP, read_run_spec=read_run_spec, parse_spec=DetectorSpec.from_dict,
        build=build_model, stored_problem=_stored_problem,
    )  # fmt: skip


def load_trained(path: str | Path) -> tuple[PPMAMaskRCNN, DetectorSpec]:
    """Model in eval mode + spec (see :func:`load_run`)."""
    model, run = load_run(path)
    return model, DetectorSpec.from_dict(run.model)
