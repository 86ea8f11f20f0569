"""Register the models with timm as soon as timm is imported, without importing it ourselves.

timm 1.0 has no plugin entry point, and importing it costs seconds, so ``import ppma_models``
does not import timm. Instead it registers ``ppma_tiny``/``ppma_small``/``ppma_base`` at once
when timm is already loaded, and otherwise leaves a finder on ``sys.meta_path`` that runs
:mod:`ppma_models.timm_support` right after timm's own import (docs/design.md §7.3).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType


def install() -> None:
    """Register now if timm is loaded, else when it is first imported; nothing without timm."""
    if "timm" in sys.modules:
        _register()
    elif importlib.util.find_spec("timm") is not None:
        sys.meta_path.insert(0, _AfterTimmImport())


def _register() -> None:
    try:
        from . import timm_support  # noqa: F401  (registers on import)
    except Exception as exc:  # an incompatible timm must not break timm itself
        warnings.warn(
            f"ppma_models: could not register the models with timm ({exc})",
            RuntimeWarning,
            stacklevel=2,
        )


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds timm's spec the usual way, then wraps its loader to register after timm loads."""

    def find_spec(
        self, fullname: str, path: object, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once: the lookup below must not come back here
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = self._loader  # timm sees its own loader afterwards
        self._loader.exec_module(module)
        _register()
