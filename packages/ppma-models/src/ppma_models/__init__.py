"""ppma_models: PPMA-T/S/B vision transformers on the ppma_ops polyline attention.

    >>> from ppma_models import create_model, get_pretrained_cfg
    >>> model = create_model("ppma_tiny", num_classes=1000)              # classifier
    >>> backbone = create_model("ppma_tiny", features_only=True)         # dense NCHW maps
    >>> get_pretrained_cfg("ppma_tiny").input_size                      # its weights' input
    (3, 224, 224)

The ops run on ppma_ops' backend (``ppma_ops.use_backend("reference")`` for the plain-PyTorch
reference); ``compile_model(model)`` is ``torch.compile`` with the settings they need. See
the package README for checkpoints (the authors' .pth files and our
safetensors, for classifiers and segmentation models alike).
"""

from __future__ import annotations

from .attention import CrissCrossAttention, PolylineAttention
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    read_checkpoint,
    read_metadata,
    save_safetensors,
    save_upstream,
)
from .compiled import compile_model
from .config import PPMAConfig
from .export import check_onnx, export_onnx
from .model import PPMA
from .pretrained import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg
from .registry import (
    create_model,
    get_config,
    get_pretrained_cfg,
    list_models,
    register_model,
)
from .segmentation import SegmentationModel, UPerHead, create_segmentation_model
from .timm_hook import install as _install_timm_hook

# ppma_models.explain stays the module (the function of that name would shadow it here).
_install_timm_hook()  # timm.create_model("ppma_tiny") works once timm is imported

__all__ = [
    "check_onnx",
    "export_onnx",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckpointError",
    "CrissCrossAttention",
    "PPMA",
    "PPMAConfig",
    "PolylineAttention",
    "PretrainedCfg",
    "SegmentationModel",
    "UPerHead",
    "compile_model",
    "create_model",
    "create_segmentation_model",
    "get_config",
    "get_pretrained_cfg",
    "list_models",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "read_metadata",
    "register_model",
    "save_safetensors",
    "save_upstream",
]
