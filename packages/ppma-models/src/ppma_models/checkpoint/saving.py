"""Writing weights: our safetensors files, and the authors' layout for their code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..convert import convert_to_upstream
from ..model import PPMA
from ..segmentation import SegmentationModel
from .metadata import describe, stored_model


def save_safetensors(
    model: PPMA | SegmentationModel | torch.nn.Module,
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the model's state dict (our key names) and what is needed to rebuild it.

    model: a :class:`PPMA` (classifier or features model), a :class:`SegmentationModel` on
    a PPMA backbone, as :func:`ppma_models.create_segmentation_model` builds it, or a
    detector (:class:`ppma_models.detection.PPMAMaskRCNN`; its settings are stored).
    class_names: stored with the model (one per class); ``load_model`` sets
    ``model.class_names``. metadata: the application's own entries, stored as strings and
    read back by :func:`ppma_models.read_metadata`; ppma_models' keys are reserved.
    """
    info = describe(model, class_names, metadata)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # The metadata must rebuild exactly this model: a head assembled by hand that
    # create_segmentation_model would build differently is refused here, not when loading.
    expected = stored_model(str(path), info).shapes()
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        differ = sorted(set(expected.items()) ^ set(found.items()))
        raise ValueError(
            "save_safetensors: the model is not what its recorded settings rebuild "
            f"({len(differ)} differing entries, e.g. {differ[:2]})"
        )
    save_file(state, str(path), metadata=info)


def save_upstream(model: PPMA, path: str | Path) -> None:
    """Write ``{"model": state}`` in the authors' key layout (for their code)."""
    torch.save({"model": convert_to_upstream(model.state_dict())}, path)
