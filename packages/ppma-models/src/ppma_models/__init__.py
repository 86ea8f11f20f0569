"""ppma_models: PPMA-T/S/B vision transformers on the ppma_ops polyline attention.

    >>> from ppma_models import create_model
    >>> model = create_model("ppma_tiny", num_classes=1000)              # classifier
    >>> backbone = create_model("ppma_tiny", features_only=True)         # dense NCHW maps

See the package README for checkpoints (the authors' .pth files and our safetensors).
"""

from __future__ import annotations

from .attention import ATTENTION_IMPLS, CrissCrossAttention, PolylineAttention
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    read_checkpoint,
    save_safetensors,
    save_upstream,
)
from .config import PPMAConfig
from .model import PPMA
from .registry import create_model, get_config, list_models, register_model
from .segmentation import SegmentationModel, UPerHead, create_segmentation_model

__all__ = [
    "ATTENTION_IMPLS",
    "CheckpointError",
    "CrissCrossAttention",
    "PPMA",
    "PPMAConfig",
    "PolylineAttention",
    "SegmentationModel",
    "UPerHead",
    "create_model",
    "create_segmentation_model",
    "get_config",
    "list_models",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "register_model",
    "save_safetensors",
    "save_upstream",
]
