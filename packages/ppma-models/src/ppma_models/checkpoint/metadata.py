"""The metadata of our safetensors files: what it records, and how it is checked on reading.

Reserved entries (all strings; JSON where structured):

* ``format`` = "ppma_models", ``format_version`` = "1";
* ``model_name``, ``config`` (the backbone's :class:`PPMAConfig`), ``num_classes``,
  ``features_only``, ``out_indices``, optional ``class_names``;
* ``segmentation_head`` for a :class:`SegmentationModel`: the :func:`create_segmentation_model`
  settings of its heads (channels, aux_channels, aux_in_index, pool_scales, dropout,
  fuse_kernel_size); ``num_classes`` and ``class_names`` are then the head's, and the backbone
  is the features model described by the other entries.
* ``detection_head`` for a Mask R-CNN (:class:`ppma_models.detection.PPMAMaskRCNN`): its
  :class:`~ppma_models.detection.DetectionSettings`; ``num_classes`` counts the object classes
  (background not counted) and the backbone is the features model over every stage.

Every other entry is the application's (``save_safetensors(metadata=...)``, read back with
:func:`ppma_models.read_metadata`). Reading treats the metadata as hostile: each value's type
and the limits below are checked before any model is built from it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import STEM_STRIDES, PPMAConfig
from ..model import PPMA
from ..segmentation import SegmentationModel, create_segmentation_model
from .errors import CheckpointError

#: metadata["format"] of the safetensors files we write.
SAFETENSORS_FORMAT = "ppma_models"
FORMAT_VERSION = "1"
SEGMENTATION_HEAD = "segmentation_head"
DETECTION_HEAD = "detection_head"
#: Metadata keys written by ppma_models; an application's own keys must differ.
RESERVED_METADATA = (
    "format",
    "format_version",
    "model_name",
    "config",
    "num_classes",
    "features_only",
    "out_indices",
    "class_names",
    SEGMENTATION_HEAD,
    DETECTION_HEAD,
)
#: Bounds on the architecture a safetensors file's metadata may describe. The shapes it implies
#: are compared with the file's header anyway; these bounds keep that comparison (a model built
#: on the meta device, a few modules per block) quick, and refuse values no PPMA model uses.
CONFIG_LIMITS: dict[str, int] = {
    "stages": 8,
    "blocks": 512,  # sum(depths)
    "width": 1 << 16,  # each of dims and head_hidden, and the segmentation heads' channels
    "in_chans": 1024,
    "mlp_ratio": 64,
    "classes": 1 << 20,
    "pool_levels": 16,  # len(pool_scales)
    "pool_scale": 256,  # each pooled grid size
    "kernel": 15,  # fuse_kernel_size
    "image_side": 1 << 14,  # a detector's min_size / max_size
    "mask_convs": 64,  # a detector's mask_head_convs
    "anchor_ratios": 16,  # a detector's aspect_ratios
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------- writing
def _detector_type() -> type | None:
    """:class:`~ppma_models.detection.PPMAMaskRCNN` once its module is loaded, else None (no
    detector exists then, and torchvision stays unimported)."""
    module = sys.modules.get("ppma_models.detection")
    return None if module is None else module.PPMAMaskRCNN


def _parts(model: nn.Module) -> tuple[PPMA, int, dict[str, str]]:
    """(PPMA backbone, number of classes, head entries) of a model ``describe`` accepts."""
    detector = _detector_type()
    if isinstance(model, SegmentationModel):
        if not isinstance(model.backbone, PPMA):
            raise TypeError(
                "save_safetensors: a SegmentationModel is saved with a PPMA backbone only, "
                f"this one has a {type(model.backbone).__name__}"
            )
        head = {SEGMENTATION_HEAD: json.dumps(model.head_settings())}
        return model.backbone, model.num_classes, head
    if detector is not None and isinstance(model, detector):
        head = {DETECTION_HEAD: json.dumps(model.settings.to_dict())}
        return model.backbone.body, model.num_classes, head
    if isinstance(model, PPMA):
        return model, model.num_classes, {}
    raise TypeError(
        f"model must be a PPMA, a SegmentationModel or a PPMAMaskRCNN, got {type(model).__name__}"
    )


def describe(
    model: nn.Module,
    class_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The metadata :func:`save_safetensors` writes for ``model`` (see the module docstring)."""
    backbone, num_classes, head = _parts(model)
    if class_names is not None and (head or backbone.head is not None):
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but the model has {num_classes} "
                "classes"
            )
    info = {
        "format": SAFETENSORS_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": backbone.name or "",
        "config": json.dumps(backbone.config.to_dict()),
        "num_classes": str(num_classes),
        "features_only": json.dumps(backbone.features_only),
        "out_indices": json.dumps(list(backbone.out_indices)),
    }
    info.update(head)
    if class_names is not None:
        info["class_names"] = json.dumps(list(class_names))
    for key, value in (metadata or {}).items():
        if key in RESERVED_METADATA:
            raise ValueError(f"metadata key {key!r} is reserved (ppma_models: {RESERVED_METADATA})")
        info[str(key)] = str(value)
    return info


# ----------------------------------------------------------------------------------- reading
# PPMAConfig field -> (check of one value, per-stage list?, what is expected). JSON gives no
# types, so each is checked before PPMAConfig does arithmetic with it.
_CONFIG_FIELDS: dict[str, tuple[Callable[[object], bool], bool, str]] = {
    "dims": (_is_int, True, "a list of integers"),
    "depths": (_is_int, True, "a list of integers"),
    "heads": (_is_int, True, "a list of integers"),
    "mlp_ratios": (_is_real, True, "a list of numbers"),
    "attention_kinds": (lambda v: isinstance(v, str), True, "a list of strings"),
    "layer_scale": (lambda v: isinstance(v, bool), True, "a list of booleans"),
    "drop_path_rate": (_is_real, False, "a number"),
    "layer_scale_init": (_is_real, False, "a number"),
    "head_hidden": (_is_int, False, "an integer"),
    "in_chans": (_is_int, False, "an integer"),
    "stem_stride": (_is_int, False, "an integer"),
}
_REQUIRED_CONFIG = ("dims", "depths", "heads", "mlp_ratios", "attention_kinds")
_REQUIRED_METADATA = ("format_version", "config", "num_classes", "features_only", "out_indices")


def _fields_problem(
    data: object,
    fields: Mapping[str, tuple[Callable[[object], bool], bool, str]],
    required: Sequence[str],
) -> str | None:
    """Type problems of a JSON object against ``fields``, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {_short(data)}"
    unknown = sorted(set(data) - set(fields))
    missing = [k for k in required if k not in data]
    if unknown or missing:
        return f"unknown field(s) {unknown}, missing field(s) {missing}"
    for name, value in data.items():
        check, is_list, expected = fields[name]
        ok = isinstance(value, list) and all(map(check, value)) if is_list else check(value)
        if not ok:
            return f"{name} must be {expected}, got {_short(value)}"
    return None


def _limits_problem(bounds: Sequence[tuple[bool, str]]) -> str | None:
    broken = [rule for ok, rule in bounds if not ok]
    return f"outside the limits ({'; '.join(broken)})" if broken else None


def config_problem(data: object) -> str | None:
    """What makes a metadata config unusable (types, :data:`CONFIG_LIMITS`), or None."""
    problem = _fields_problem(data, _CONFIG_FIELDS, _REQUIRED_CONFIG)
    if problem is not None:
        return problem
    lim = CONFIG_LIMITS
    widths = [*data["dims"], data.get("head_hidden", 1)]
    return _limits_problem(
        [
            (1 <= len(data["dims"]) <= lim["stages"], f"1 to {lim['stages']} stages"),
            (min(data["depths"], default=0) >= 0, "depths >= 0"),
            (sum(data["depths"]) <= lim["blocks"], f"at most {lim['blocks']} blocks in all"),
            (all(1 <= w <= lim["width"] for w in widths), f"dims, head_hidden <= {lim['width']}"),
            (1 <= data.get("in_chans", 3) <= lim["in_chans"], f"in_chans <= {lim['in_chans']}"),
            (data.get("stem_stride", 4) in STEM_STRIDES, f"stem_stride in {STEM_STRIDES}"),
            (
                all(0 < r <= lim["mlp_ratio"] for r in data["mlp_ratios"]),
                f"0 < mlp_ratios <= {lim['mlp_ratio']}",
            ),
        ]
    )


# create_segmentation_model argument -> (check, list?, what is expected); all required.
_HEAD_FIELDS: dict[str, tuple[Callable[[object], bool], bool, str]] = {
    "channels": (_is_int, False, "an integer"),
    "aux_channels": (lambda v: v is None or _is_int(v), False, "an integer or null"),
    "aux_in_index": (_is_int, False, "an integer"),
    "pool_scales": (_is_int, True, "a list of integers"),
    "dropout": (_is_real, False, "a number"),
    "fuse_kernel_size": (_is_int, False, "an integer"),
}


def head_problem(data: object, num_maps: int) -> str | None:
    """What makes segmentation head settings unusable on a backbone giving ``num_maps`` maps
    (types, :data:`CONFIG_LIMITS`), or None."""
    problem = _fields_problem(data, _HEAD_FIELDS, tuple(_HEAD_FIELDS))
    if problem is not None:
        return problem
    lim = CONFIG_LIMITS
    aux = data["aux_channels"]
    scales = data["pool_scales"]
    kernel = data["fuse_kernel_size"]
    return _limits_problem(
        [
            (1 <= data["channels"] <= lim["width"], f"1 <= channels <= {lim['width']}"),
            (aux is None or 1 <= aux <= lim["width"], f"1 <= aux_channels <= {lim['width']}"),
            (
                aux is None or 0 <= data["aux_in_index"] < num_maps,
                f"aux_in_index names one of the backbone's {num_maps} maps",
            ),
            (
                1 <= len(scales) <= lim["pool_levels"]
                and all(1 <= s <= lim["pool_scale"] for s in scales),
                f"1 to {lim['pool_levels']} pool_scales, each 1 to {lim['pool_scale']}",
            ),
            (0 <= data["dropout"] < 1, "0 <= dropout < 1"),
            (
                1 <= kernel <= lim["kernel"] and kernel % 2,
                f"odd fuse_kernel_size <= {lim['kernel']}",
            ),
        ]
    )


#: DetectionSettings fields that size the detector's layers or inputs -> their bound.
_DETECTION_BOUNDS = {
    "fpn_channels": "width",
    "box_head_width": "width",
    "mask_head_channels": "width",
    "mask_head_convs": "mask_convs",
    "min_size": "image_side",
    "max_size": "image_side",
}


def detection_problem(data: object) -> str | None:
    """What makes stored detector settings unusable (types, :data:`CONFIG_LIMITS`, the
    settings' own checks), or None. Imports :mod:`ppma_models.detection` (torchvision)."""
    from ..detection import DetectionSettings

    if not isinstance(data, dict):
        return f"expected a JSON object, got {_short(data)}"
    lim = CONFIG_LIMITS
    ratios = data.get("aspect_ratios", ())
    bounds = [
        (not _is_int(data.get(k)) or data[k] <= lim[bound], f"{k} <= {lim[bound]}")
        for k, bound in _DETECTION_BOUNDS.items()
    ]
    bounds.append(
        (
            isinstance(ratios, list) and len(ratios) <= lim["anchor_ratios"],
            f"a list of at most {lim['anchor_ratios']} aspect_ratios",
        )
    )
    problem = _limits_problem(bounds)
    if problem is not None:
        return problem
    try:
        DetectionSettings.from_dict(data)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class StoredModel:
    """The model a safetensors file's metadata describes."""

    config: PPMAConfig
    num_classes: int
    features_only: bool
    out_indices: tuple[int, ...]
    name: str | None
    class_names: list[str] | None
    segmentation_head: dict[str, object] | None = None
    detection_head: dict[str, object] | None = None  # DetectionSettings, as a dict

    def build(self) -> nn.Module:
        """The described model, freshly initialised (on the default device)."""
        has_head = self.segmentation_head is not None or self.detection_head is not None
        backbone = PPMA(
            self.config,
            num_classes=0 if has_head else self.num_classes,
            features_only=self.features_only,
            out_indices=self.out_indices,
            name=self.name,
        )
        if self.detection_head is not None:
            from ..detection import DetectionSettings, PPMAMaskRCNN

            settings = DetectionSettings.from_dict(self.detection_head)
            return PPMAMaskRCNN(backbone, self.num_classes, settings, name=self.name)
        if self.segmentation_head is None:
            return backbone
        return create_segmentation_model(backbone, self.num_classes, **self.segmentation_head)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state-dict entry's shape, from a model built on the meta device: parameters
        get shapes but no memory, so a description far larger than any file costs nothing."""
        with torch.device("meta"):
            model: nn.Module = self.build()
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _metadata_json(path: str, meta: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from None


def _stored_config(path: str, meta: Mapping[str, str]) -> PPMAConfig:
    data = _metadata_json(path, meta, "config")
    problem = config_problem(data)
    if problem is None:
        try:
            return PPMAConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            problem = str(exc)
    raise CheckpointError(f"{path}: the metadata's config is not usable: {problem}")


def _check_format(path: str, meta: Mapping[str, str]) -> None:
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(
            f"{path}: safetensors file without ppma_models metadata; build the model "
            "with create_model(...) and use load_checkpoint instead"
        )
    missing = [k for k in _REQUIRED_METADATA if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: the ppma_models metadata lacks {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {_short(meta['format_version'])} is not readable here "
            f"(this version of ppma_models reads {FORMAT_VERSION!r})"
        )


def _stored_heads(
    path: str, meta: Mapping[str, str], values: Mapping[str, object]
) -> tuple[dict | None, dict | None]:
    """The checked (segmentation head, detection head) settings; (None, None) for a PPMA."""
    found = [key for key in (SEGMENTATION_HEAD, DETECTION_HEAD) if key in meta]
    if not found:
        return None, None
    if len(found) > 1:
        raise CheckpointError(f"{path}: the metadata describes two heads {found}")
    (key,) = found
    head = _metadata_json(path, meta, key)
    if values["features_only"] is not True or values["num_classes"] < 1:
        raise CheckpointError(
            f"{path}: a {key} needs a features_only backbone and num_classes >= 1, "
            f"the metadata has features_only={_short(values['features_only'])}, "
            f"num_classes={_short(values['num_classes'])}"
        )
    if key == SEGMENTATION_HEAD:
        problem = head_problem(head, len(values["out_indices"]))
    else:
        problem = detection_problem(head)
    if problem is not None:
        raise CheckpointError(f"{path}: the metadata's {key} is not usable: {problem}")
    return (head, None) if key == SEGMENTATION_HEAD else (None, head)


def stored_model(path: str, meta: Mapping[str, str]) -> StoredModel:
    """Parse and check the metadata written by :func:`describe` (see the module docstring)."""
    _check_format(path, meta)
    config = _stored_config(path, meta)
    values = {k: _metadata_json(path, meta, k) for k in _REQUIRED_METADATA[2:]}
    names = _metadata_json(path, meta, "class_names") if "class_names" in meta else None
    checks = {
        "num_classes": _is_int(values["num_classes"])
        and 0 <= values["num_classes"] <= CONFIG_LIMITS["classes"],
        "features_only": isinstance(values["features_only"], bool),
        "out_indices": isinstance(values["out_indices"], list)
        and all(map(_is_int, values["out_indices"])),
        "class_names": names is None
        or (isinstance(names, list) and all(isinstance(n, str) for n in names)),
    }
    shown = {**values, "class_names": names}
    bad = [f"{k}={_short(shown[k])}" for k, ok in checks.items() if not ok]
    if bad:
        raise CheckpointError(f"{path}: invalid metadata value(s): {', '.join(bad)}")
    segmentation, detection = _stored_heads(path, meta, values)
    has_classes = segmentation is not None or detection is not None or not values["features_only"]
    if names is not None and has_classes and len(names) != values["num_classes"]:
        raise CheckpointError(
            f"{path}: the metadata lists {len(names)} class names for "
            f"{values['num_classes']} classes"
        )
    return StoredModel(
        config,
        values["num_classes"],
        values["features_only"],
        tuple(values["out_indices"]),
        meta.get("model_name") or None,
        names,
        segmentation,
        detection,
    )
