"""The ppma_ops native kernels against the authors' attention outputs (docs/design.md §3).

The official attention fixtures run through the real attention modules (q/k/v projections,
decay field, flat rotary embedding, LePE, output projection) with ``ppma_ops``' native
backend: the end-to-end check of the fused kernels, in float64 and float32, that the ops'
own tests (against the reference ops) cannot give.
"""

from __future__ import annotations

import json

import numpy as np
import ppma_ops
import pytest
import torch
from ppma_models import CrissCrossAttention, PolylineAttention
from ppma_models.convert import convert_from_upstream
from ppma_models.rope import FlatRotaryEmbedding
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(scope="module", autouse=True)
def _native_ops() -> None:
    # A missing kernel is a build failure, not a reason to skip.
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"


class _OpNames(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _fixture(reference_dir, kind: str):
    """The module of the fixture (``whole``: vanilla, ``chunk``: criss-cross) with the authors'
    weights, its input and its expected output."""
    meta = json.loads((reference_dir / f"attention_{kind}.json").read_text())
    with np.load(reference_dir / f"attention_{kind}.npz") as z:
        weights = {name[len("state/") :]: torch.from_numpy(z[name])
                   for name in z.files if name.startswith("state/")}  # fmt: skip
        x, expected = torch.from_numpy(z["input"]), torch.from_numpy(z["output/y"])
    module = {"whole": PolylineAttention, "chunk": CrissCrossAttention}[kind](
        meta["embed_dim"], meta["num_heads"]
    )
    # The module's upstream keys are those of block 0 of stage 0 of a whole model.
    ours = convert_from_upstream(
        {f"layers.0.blocks.0.retention.{n}": w for n, w in weights.items()}
    )
    prefix = "stages.0.blocks.0.attn."
    module.load_state_dict({n.removeprefix(prefix): w for n, w in ours.items()}, strict=True)
    return module.eval(), x, expected


@pytest.mark.parametrize(
    ("kind", "dtype", "tol"),
    [
        ("whole", torch.float64, 1e-5),
        ("whole", torch.float32, 1e-4),
        ("chunk", torch.float32, 1e-5),
    ],
)
def test_native_kernels_reproduce_the_official_attention(
    reference_dir, relative_error, kind, dtype, tol
) -> None:
    module, x, expected = _fixture(reference_dir, kind)
    module, x, expected = module.to(dtype), x.to(dtype), expected.to(dtype)
    _, h, w, _ = x.shape
    rotary = FlatRotaryEmbedding(module.head_dim)(h, w, device=x.device, dtype=x.dtype)
    with ppma_ops.use_backend("native"), torch.no_grad(), _OpNames() as ops:
        y = module(x, rotary)
    op = "polyline_attention" if kind == "whole" else "criss_cross_attention"
    assert any(name.startswith(f"ppma._{op}") for name in ops.names), "the native op did not run"
    assert y.shape == expected.shape and y.dtype == dtype
    error = relative_error(y, expected)
    assert error < tol, f"relative error {error:.2e} against the official fixture"
