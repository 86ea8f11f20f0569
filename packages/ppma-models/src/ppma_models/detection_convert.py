"""Detector checkpoints: mmdetection's layout ↔ ours, and loading any of them safely.

The authors trained their detectors with mmdetection; its ``MaskRCNN`` names the parts
``backbone.`` (the PPMA trunk in the authors' layout, with ``outnorm{i}`` per stage),
``neck.`` (FPN: ``lateral_convs.i.conv``, ``fpn_convs.i.conv``), ``rpn_head.`` (``rpn_conv``,
``rpn_cls``, ``rpn_reg``) and ``roi_head.`` (``bbox_head.shared_fcs.{0,1}``, ``fc_cls``,
``fc_reg``; ``mask_head.convs.i.conv``, ``upsample``, ``conv_logits``). Ours are torchvision's
(:class:`ppma_models.detection.PPMAMaskRCNN`). Besides names, the class-specific layers differ:

* ``fc_cls`` (C + 1 rows) has the background last; torchvision's ``cls_score`` has it first;
* ``fc_reg`` (4·C rows) and ``conv_logits`` (C channels) have no background entry;
  torchvision's ``bbox_pred`` and ``mask_fcn_logits`` do, and never use it: it is filled with zeros
  on import and dropped on export. A class-agnostic ``fc_reg`` (4 rows) or ``conv_logits``
  (1 channel) is repeated for every class, which computes the same thing.

So mmdetection → ours → mmdetection returns every tensor exactly. Files are read with
``torch.load(weights_only=True)``: a file that needs any Python object besides tensors and
plain containers is refused (unless the caller allows the class), never unpickled.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, LoadResult, check_dtypes, load_checkpoint
from .convert import (
    AngleMismatchError,
    convert_from_upstream,
    convert_to_upstream,
    is_upstream_state_dict,
)
from .detection import PPMAMaskRCNN

__all__ = [
    "DetectionLoadResult",
    "convert_from_mmdet",
    "convert_to_mmdet",
    "is_mmdet_state_dict",
    "load_detection_checkpoint",
    "read_detection_checkpoint",
    "save_mmdet",
]

# Plain renames outside the backbone: (mmdetection prefix, our prefix), with {i} a layer index.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"roi_head\.mask_head\.upsample\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"roi_head\.mask_head\.conv_logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
)
_BACK_RENAMES: tuple[tuple[str, str], ...] = (
    (r"backbone\.fpn\.inner_blocks\.(\d+)\.0\.", r"neck.lateral_convs.\1.conv."),
    (r"backbone\.fpn\.layer_blocks\.(\d+)\.0\.", r"neck.fpn_convs.\1.conv."),
    (r"rpn\.head\.conv\.0\.0\.", "rpn_head.rpn_conv."),
    (r"rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
    (r"rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
    (r"roi_heads\.box_head\.fc6\.", "roi_head.bbox_head.shared_fcs.0."),
    (r"roi_heads\.box_head\.fc7\.", "roi_head.bbox_head.shared_fcs.1."),
    (r"roi_heads\.box_predictor\.cls_score\.", "roi_head.bbox_head.fc_cls."),
    (r"roi_heads\.box_predictor\.bbox_pred\.", "roi_head.bbox_head.fc_reg."),
    (r"roi_heads\.mask_head\.(\d+)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
    (r"roi_heads\.mask_predictor\.conv5_mask\.", "roi_head.mask_head.upsample."),
    (r"roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_head.mask_head.conv_logits."),
)
_RENAME_RE = [(re.compile(rf"^{a}(weight|bias)$"), b) for a, b in _RENAMES]
_BACK_RE = [(re.compile(rf"^{a}(weight|bias)$"), b) for a, b in _BACK_RENAMES]
_HEAD_PREFIXES = ("neck.", "rpn_head.", "roi_head.")
#: Our tensors whose first dimension counts classes (the rest of the model does not depend on C).
CLASS_LAYERS = (
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.bias",
)


def is_mmdet_state_dict(state: Mapping[str, object]) -> bool:
    """True if the keys follow mmdetection's two-stage detector layout (neck, RPN, RoI head)."""
    return any(k.startswith(_HEAD_PREFIXES) for k in state)


def _rename(key: str, table: Sequence[tuple[re.Pattern, str]]) -> str | None:
    for pattern, replacement in table:
        if pattern.match(key):
            return pattern.sub(replacement + r"\g<" + str(pattern.groups) + ">", key)
    return None


def _class_rows(value: torch.Tensor, group: int, classes: int, key: str) -> torch.Tensor:
    """mmdetection's per-class rows (``group`` rows per class) → ours, background first."""
    rows = value.shape[0] if value.ndim else 0
    if rows == group and classes > 1:  # class-agnostic: the same rows for every class
        per_class = value
        value = value.repeat(classes, *([1] * (value.ndim - 1)))
    elif rows == group * classes:
        per_class = value[:group]
    else:
        raise CheckpointError(
            f"{key}: {rows} rows, expected {group} per class for {classes} classes "
            f"(or {group}, class-agnostic)"
        )
    return torch.cat([torch.zeros_like(per_class), value])


def _num_classes(state: Mapping[str, torch.Tensor]) -> int:
    """Object classes of an mmdetection state dict, from ``fc_cls`` (background included)."""
    fc_cls = state.get("roi_head.bbox_head.fc_cls.weight")
    if not isinstance(fc_cls, torch.Tensor) or fc_cls.ndim != 2 or fc_cls.shape[0] < 2:
        shape = tuple(fc_cls.shape) if isinstance(fc_cls, torch.Tensor) else None
        raise CheckpointError(
            f"roi_head.bbox_head.fc_cls.weight must be (classes + 1, width), got {shape}"
        )
    return fc_cls.shape[0] - 1


def _convert_backbone(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The ``backbone.`` part: authors' PPMA names → ours, under ``backbone.body.``."""
    trunk = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if is_upstream_state_dict(trunk):
        try:
            trunk = convert_from_upstream(trunk, config)
        except AngleMismatchError as exc:
            raise CheckpointError(str(exc)) from None
    return {f"backbone.body.{k}": v for k, v in trunk.items()}


def convert_from_mmdet(
    state: Mapping[str, torch.Tensor], config=None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """mmdetection state dict → (ours, keys that follow neither layout).

    ``config`` (the backbone's :class:`~ppma_models.config.PPMAConfig`) lets the rotary
    frequencies stored by the authors' backbone be checked against the model's head sizes.
    """
    classes = _num_classes(state)
    out = _convert_backbone(state, config)
    unknown = []
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        new = _rename(key, _RENAME_RE)
        if new is None:
            unknown.append(key)
            continue
        if new.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[-1:], value[:-1]])  # background: last → first
        elif new.startswith("roi_heads.box_predictor.bbox_pred."):
            value = _class_rows(value, 4, classes, key)
        elif new.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            value = _class_rows(value, 1, classes, key)
        out[new] = value
    return out, unknown


def convert_to_mmdet(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → mmdetection's layout (the backbone in the authors' names).

    Raises KeyError for a key with no counterpart there.
    """
    trunk = {
        k[len("backbone.body.") :]: v for k, v in state.items() if k.startswith("backbone.body.")
    }
    out = {f"backbone.{k}": v for k, v in convert_to_upstream(trunk).items()}
    for key, value in state.items():
        if key.startswith("backbone.body."):
            continue
        new = _rename(key, _BACK_RE)
        if new is None:
            raise KeyError(f"{key!r} has no counterpart in mmdetection's layout")
        if key.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[1:], value[:1]])  # background: first → last
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            value = value[4:]
        elif key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            value = value[1:]
        out[new] = value.clone()
    return out


def save_mmdet(
    model: PPMAMaskRCNN, path: str | Path, *, class_names: Sequence[str] | None = None
) -> None:
    """Write ``{"state_dict": ..., "meta": {"CLASSES": ...}}`` in mmdetection's layout."""
    meta = {"CLASSES": tuple(class_names)} if class_names is not None else {}
    torch.save({"state_dict": convert_to_mmdet(model.state_dict()), "meta": meta}, path)


# --------------------------------------------------------------------------------- reading
def _safe_load(path: Path, allowed_globals: Iterable[type]) -> object:
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it needs the object {found[1]!r}" if found else "its pickle is not plain data"
        raise CheckpointError(
            f"refusing to load {str(path)!r}: {what}, and unpickling arbitrary objects can run "
            "code. Checkpoints are read with torch.load(weights_only=True); if you trust the "
            "file and the object is harmless data, pass its class in allowed_globals."
        ) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first})"
        ) from exc


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _class_names(obj: Mapping) -> list[str] | None:
    """Class names an mmdetection checkpoint records (2.x ``meta.CLASSES``, 3.x
    ``meta.dataset_meta.classes``)."""
    meta = obj.get("meta")
    if not isinstance(meta, Mapping):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def read_detection_checkpoint(
    path: str | Path, *, allowed_globals: Sequence[type] = ()
) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """(state dict with wrapper prefixes removed, recorded class names or None) of a
    ``.pth``/``.pt`` or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{str(path)!r} is not a valid safetensors file: {exc}") from None
    obj = _safe_load(path, allowed_globals)
    names = _class_names(obj) if isinstance(obj, Mapping) else None
    if not _is_state_dict(obj):
        key = next(
            (k for k in ("state_dict", "model") if isinstance(obj, Mapping) and k in obj), None
        )
        if key is None or not _is_state_dict(obj[key]):
            top = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{str(path)!r}: no state dict found (top level: {top})")
        obj = obj[key]
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, names


# --------------------------------------------------------------------------------- loading
@dataclass
class DetectionLoadResult:
    """What :func:`load_detection_checkpoint` did (key names are ours)."""

    path: str
    kind: str  #: "mmdetection", "detector" (our layout) or "backbone" (a backbone checkpoint)
    class_names: list[str] | None = None  #: as the file records them (mmdetection meta)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    kept_init: list[str] = field(default_factory=list)  #: class layers of another class count
    backbone: LoadResult | None = None  #: for kind "backbone", the backbone loader's result


def _is_our_detector(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("rpn.", "roi_heads.", "backbone.fpn.")) for k in state)


def _shape_problems(own: Mapping, state: Mapping) -> list[str]:
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    return [f"{len(wrong)} shape(s) differ: " + "; ".join(wrong[:6])] if wrong else []


def _fit_detector(
    model: PPMAMaskRCNN, state: dict[str, torch.Tensor], result: DetectionLoadResult, strict: bool
) -> None:
    """Check every tensor against the model, then load; CheckpointError names the file."""
    own = model.state_dict()
    cls_score = state.get(CLASS_LAYERS[0])
    if isinstance(cls_score, torch.Tensor) and cls_score.shape[0] != model.num_classes + 1:
        # Another dataset's classes: keep the fresh class layers (fine-tuning).
        result.kept_init = [k for k in CLASS_LAYERS if k in own]
        state = {k: v for k, v in state.items() if k not in CLASS_LAYERS}
    result.missing = sorted(set(own) - set(state) - set(result.kept_init))
    result.unexpected = sorted(set(state) - set(own))
    foreign_trunk = [k for k in result.unexpected if k.startswith("backbone.body.")]
    if foreign_trunk and not any(k in own for k in state if k.startswith("backbone.body.")):
        raise CheckpointError(
            f"{result.path}: its backbone is not a PPMA backbone (keys such as "
            f"{foreign_trunk[:3]}); only PPMA detectors load into this model"
        )
    problems = _shape_problems(own, state)
    if strict and (result.missing or result.unexpected):
        problems.append(
            f"{len(result.missing)} missing key(s) {result.missing[:6]}, "
            f"{len(result.unexpected)} unexpected key(s) {result.unexpected[:6]}"
        )
    if problems:
        raise CheckpointError(
            f"{result.path} does not fit the detector {model.name or ''} "
            f"({model.num_classes} classes): " + "; ".join(problems)
        )
    check_dtypes(state, own, LoadResult(result.path, result.kind))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_detection_checkpoint(
    model: PPMAMaskRCNN,
    path: str | Path,
    *,
    strict: bool = True,
    allowed_globals: Sequence[type] = (),
) -> DetectionLoadResult:
    """Load a checkpoint into ``model``; which parts depends on what the file holds.

    * an mmdetection Mask R-CNN file of a PPMA backbone (the authors' COCO checkpoints):
      converted (see the module docstring), every tensor checked, the whole detector loaded;
    * a file in our layout (``backbone.body.``, ``backbone.fpn.``, ``rpn.``, ``roi_heads.``):
      the whole detector;
    * anything else is a backbone checkpoint -- the authors' ImageNet classifiers, ours, or a
      dense (mmseg) backbone -- loaded into ``model.backbone.body`` by
      :func:`ppma_models.checkpoint.load_checkpoint` (the classifier head is dropped).

    A detector file with another number of classes loads all but the class layers
    (:data:`CLASS_LAYERS`, listed in ``kept_init``). Anything else that does not fit raises
    :class:`~ppma_models.checkpoint.CheckpointError` naming the file; missing or unexpected
    keys only with ``strict=True``.
    """
    if not isinstance(model, PPMAMaskRCNN):
        raise TypeError(f"model must be a PPMAMaskRCNN, got {type(model).__name__}")
    state, names = read_detection_checkpoint(path, allowed_globals=allowed_globals)
    result = DetectionLoadResult(str(path), "detector", names)
    if is_mmdet_state_dict(state):
        result.kind = "mmdetection"
        try:
            state, unknown = convert_from_mmdet(state, model.backbone_config)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if unknown:
            raise CheckpointError(
                f"{path}: {len(unknown)} tensor(s) outside mmdetection's Mask R-CNN + FPN "
                f"layout: {unknown[:6]}"
            )
    elif not _is_our_detector(state):
        result.kind = "backbone"
        result.backbone = load_checkpoint(
            model.backbone.body, path, strict=strict, allowed_globals=allowed_globals
        )
        return result
    _fit_detector(model, state, result, strict)
    return result
