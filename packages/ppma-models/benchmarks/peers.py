"""The authors' models as benchmark peers, imported at run time from their own files.

The authors' repository (github.com/zhongchenzhao/PPMA) holds ``classification/models/PPMA.py``
(``PPMAViT_T/S/B``) and ``classification/models/RMT.py`` (``RMT_T/S/B``, the RetNet-style
model PPMA is built on). Nothing of them is part of this repository: ``bench_models.py``
imports the files the user names (``--authors-ppma``, ``--authors-rmt``). Packages those files
import that this environment lacks are replaced by small stand-ins first, built from torch and
ppma_models; the stand-ins never run in the timed code except DropPath (timm's, or ours when
timm is missing).

The authors' PPMA gets the weights of ours through ``ppma_models.convert`` (their key layout),
so the two compute the same function, which :func:`logits_agreement` checks before timing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

#: Our registry name → the size letter of the authors' builder functions (PPMAViT_T, RMT_T, ...).
SIZES = {"ppma_tiny": "T", "ppma_small": "S", "ppma_base": "B"}

#: Peer label → (builder prefix in the authors' file, what the tables call it).
PEERS = {
    "authors_ppma": ("PPMAViT_", "authors' PPMA"),
    "authors_rmt": ("RMT_", "RMT"),
}


def _stub_module(name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _install_stand_ins() -> None:
    """Stand-ins for the imports of the authors' files that are not installed here.

    einops: imported by RMT.py and never used. timm: DropPath, trunc_normal_, to_2tuple, the
    model registry and ``_cfg``, all the files take from it.
    """
    try:
        import einops  # noqa: F401
    except ImportError:

        def einsum(*args: object, **kwargs: object) -> None:
            raise NotImplementedError("einops is not installed (stand-in for the benchmark)")

        _stub_module("einops", einsum=einsum)
    try:
        import timm.models.layers  # noqa: F401
        import timm.models.registry  # noqa: F401
        import timm.models.vision_transformer  # noqa: F401
    except ImportError:
        from ppma_models.drop_path import DropPath

        def register_model(fn):  # the registry only matters to timm.create_model
            return fn

        _stub_module("timm")
        _stub_module("timm.models")
        _stub_module(
            "timm.models.layers",
            DropPath=DropPath,
            trunc_normal_=nn.init.trunc_normal_,
            to_2tuple=lambda x: tuple(x) if isinstance(x, tuple | list) else (x, x),
        )
        _stub_module("timm.models.registry", register_model=register_model)
        _stub_module(
            "timm.models.vision_transformer",
            VisionTransformer=nn.Module,
            _cfg=lambda **kwargs: dict(kwargs),
        )


def load_authors_file(path: str | Path, label: str) -> types.ModuleType:
    """Import the authors' model file at ``path`` as module ``ppma_bench_<label>``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--{label.replace('_', '-')}: no file at {path}")
    _install_stand_ins()
    name = f"ppma_bench_{label}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # timm's register_model looks the module up by name
    spec.loader.exec_module(module)
    return module


def build_peer(module: types.ModuleType, label: str, model_name: str) -> nn.Module:
    """The authors' counterpart of ``model_name`` (e.g. PPMAViT_T for ppma_tiny)."""
    prefix, _ = PEERS[label]
    builder = f"{prefix}{SIZES[model_name]}"
    if not hasattr(module, builder):
        raise AttributeError(f"{module.__file__} has no {builder}() (the {label} file?)")
    torch.manual_seed(0)
    return getattr(module, builder)(None)


def transfer_weights(authors: nn.Module, ours: nn.Module) -> None:
    """Load the authors' PPMA weights into our model through the key converter."""
    from ppma_models.convert import convert_from_upstream

    ours.load_state_dict(convert_from_upstream(authors.state_dict(), ours.config), strict=True)


def logits_agreement(authors: nn.Module, ours: nn.Module, size: int, batch: int = 2) -> dict:
    """Eval-mode logits of both on one random batch: max |difference| and max |logit|."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size)
    authors.eval()
    ours.eval()
    with torch.no_grad():
        a, b = authors(x), ours(x)
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    return {"batch": batch, "size": size, "max_abs_diff": diff, "max_abs_logit": scale}


def file_record(path: str | Path) -> dict:
    """Where a peer file came from and its SHA-256, for the report."""
    data = Path(path).read_bytes()
    return {"path": str(Path(path).resolve()), "sha256": hashlib.sha256(data).hexdigest()}
