"""Rebuilding a model from a weights file alone: :func:`load_model`.

A safetensors file's header is read first: its metadata is checked (types and
:data:`CONFIG_LIMITS`), the described model is built on the ``meta`` device and every tensor
shape is compared with the header before anything is allocated, so a header describing a
huge model cannot make it allocate more than the file holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..convert import AngleMismatchError, convert_from_upstream, is_upstream_state_dict
from ..model import PPMA
from ..registry import create_model, model_for_upstream_name
from ..segmentation import SegmentationModel
from .errors import CheckpointError
from .loading import load_checkpoint
from .metadata import StoredModel, stored_model
from .reading import file_format, read_checkpoint, safetensors_header


def _check_header(path: str, stored: StoredModel, header: Mapping[str, tuple[int, ...]]) -> None:
    """Compare the file's tensors with those of the model its metadata describes."""
    try:
        expected = stored.shapes()
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the metadata describes no valid model: {exc}") from None
    wrong = [
        f"{k} is {header[k]} in the file, {expected[k]} by the metadata"
        for k in expected
        if header.get(k, expected[k]) != expected[k]
    ]
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    problems = [
        f"{len(found)} {what}: {', '.join(found[:4])}{', ...' if len(found) > 4 else ''}"
        for what, found in (
            ("shape(s) differ", wrong),
            ("tensor(s) missing", missing),
            ("unexpected tensor(s)", unexpected),
        )
        if found
    ]
    if problems:
        raise CheckpointError(
            f"{path}: the tensors do not match the model its metadata describes; "
            + "; ".join(problems)
        )


def _upstream_model(
    path: str, state: Mapping[str, torch.Tensor], upstream_name: str | None
) -> PPMA:
    """The registered model an authors' classification file names in ``args.model``."""
    name = model_for_upstream_name(upstream_name or "")
    if name is None:
        raise CheckpointError(
            f"{path}: cannot tell which model this is (args.model = {upstream_name!r}); "
            "use create_model(name, pretrained=path)"
        )
    try:
        converted = convert_from_upstream(state) if is_upstream_state_dict(state) else state
    except AngleMismatchError as exc:
        raise CheckpointError(f"{path} does not fit {name}: {exc}") from exc
    fc = converted.get("head.fc.weight")
    if fc is not None and fc.ndim != 2:
        raise CheckpointError(f"{path}: head.fc.weight has shape {tuple(fc.shape)}, not 2-D")
    num_classes = fc.shape[0] if fc is not None else 0
    return create_model(name, num_classes=num_classes, pretrained=path)


def load_model(
    path: str | Path, *, allowed_globals: Sequence[type] = ()
) -> PPMA | SegmentationModel | torch.nn.Module:
    """Rebuild a model from a file alone.

    Works for our safetensors files — a :class:`PPMA`, a :class:`SegmentationModel` or a
    Mask R-CNN detector (:class:`ppma_models.detection.PPMAMaskRCNN`), with
    ``model.class_names`` set when saved — and for the authors' classification checkpoints
    whose ``args.model`` is a registered model's upstream name (PPMAViT_T/S/B, see
    :func:`ppma_models.get_pretrained_cfg`). A safetensors file's metadata and shapes are
    checked against each other before the model is built (see the module docstring).
    """
    path = Path(path)
    if file_format(path) == "safetensors":
        header, meta = safetensors_header(path)
        stored = stored_model(str(path), meta)
        _check_header(str(path), stored, header)
        model = stored.build()
        load_checkpoint(model, path)
        if stored.class_names is not None:
            model.class_names = stored.class_names
        return model
    state, result = read_checkpoint(path, allowed_globals=allowed_globals)
    return _upstream_model(result.path, state, result.metadata.get("upstream_model"))
