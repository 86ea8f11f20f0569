"""Reading and writing PPMA weights.

Two kinds of files:

* the authors' PyTorch files (``torch.save`` pickles): classification checkpoints — a dict
  with ``model``, ``model_ema``, ``optimizer``, ``epoch`` and an ``args`` argparse.Namespace —
  and mmseg/mmdet checkpoints — ``state_dict`` (or ``model``) with backbone keys under
  ``backbone.`` and per-stage ``outnorm{i}`` LayerNorms;
* our safetensors files: the state dict in our names plus metadata (model name, config,
  number of classes, segmentation head settings, optional class names, the application's own
  entries), so :func:`load_model` can rebuild a :class:`~ppma_models.PPMA` or a
  :class:`~ppma_models.SegmentationModel` from the file alone.

Files are untrusted input: whatever is wrong with one is one :class:`CheckpointError` naming
the file. Modules: :mod:`.reading` (file kinds, the safe unpickler, headers),
:mod:`.metadata` (what our metadata records and how it is checked), :mod:`.loading`
(tensors into a built model: key conversion, shapes, dtypes), :mod:`.saving` and
:mod:`.rebuilding` (:func:`load_model`).
"""

from __future__ import annotations

from .errors import CheckpointError, CheckpointWarning
from .loading import INPUT_CONV, WEIGHT_CHOICES, adapt_input_channels, check_dtypes, load_checkpoint
from .metadata import (
    CONFIG_LIMITS,
    RESERVED_METADATA,
    SAFETENSORS_FORMAT,
    config_problem,
    detection_problem,
)
from .reading import DEFAULT_ALLOWED_GLOBALS, LoadResult, read_checkpoint, read_metadata
from .rebuilding import load_model
from .saving import save_safetensors, save_upstream

__all__ = [
    "CONFIG_LIMITS",
    "DEFAULT_ALLOWED_GLOBALS",
    "INPUT_CONV",
    "RESERVED_METADATA",
    "SAFETENSORS_FORMAT",
    "WEIGHT_CHOICES",
    "CheckpointError",
    "CheckpointWarning",
    "LoadResult",
    "adapt_input_channels",
    "check_dtypes",
    "config_problem",
    "detection_problem",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "read_metadata",
    "save_safetensors",
    "save_upstream",
]
