"""ONNX export of PPMA models, with the attention as standard ONNX operators (docs/design.md §7.1).

The fused ppma_ops kernels are PyTorch custom operators that no ONNX runtime knows. The model
is therefore traced with the pure-PyTorch reference ops (``ppma_ops.use_backend("reference")``),
whose masked attention is plain tensor algebra — cumulative sums, matrix products, softmaxes —
and which ``torch.onnx`` translates operator by operator. The exported graph computes what the
native kernels compute (to float rounding) but materialises each vanilla-attention stage's
N×N mask, as the authors' code does; criss-cross stages need only H·W·(H + W) entries.

    >>> model = ppma_models.create_model("ppma_tiny").eval()
    >>> ppma_models.export_onnx(model, "ppma_tiny.onnx")          # dynamic batch, height, width
    >>> check_onnx("ppma_tiny.onnx", model, [(224, 224), (320, 256)])   # max |ONNX − PyTorch|

Needs the ``onnx`` and ``onnxscript`` packages (``torch.onnx``'s exporter); :func:`check_onnx`
needs ``onnxruntime``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import ppma_ops
import torch
from torch import nn

__all__ = [
    "DEFAULT_OPSET",
    "AdaptiveAvgPoolByMatrices",
    "OnnxExportError",
    "check_onnx",
    "export_onnx",
    "onnx_output_names",
]

#: ONNX opset of the exported graphs (LayerNormalization needs ≥ 17).
DEFAULT_OPSET = 18

# Above this many bytes of weights the file gets a ".data" companion: protobuf's 2 GiB limit.
_SINGLE_FILE_LIMIT = 1536 << 20
_DYNAMIC_NAMES = {0: "batch", 2: "height", 3: "width"}


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    values = (size, size) if isinstance(size, int) else tuple(size)
    if len(values) != 2 or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return values


def _total_stride(model: nn.Module) -> int:
    """The coarsest reduction any ``feature_info`` in the model reports (32 if none does)."""
    strides = [32]
    for m in model.modules():
        info = getattr(m, "feature_info", None)
        if isinstance(info, Sequence):
            strides += [
                int(i["reduction"]) for i in info if isinstance(i, dict) and "reduction" in i
            ]
    return max(strides)


def _min_traced_side(model: nn.Module) -> int:
    """The smallest side whose coarsest grid is ≥ 2 and larger than every adaptive-pooling
    output size (1, 2, 3, 6 in UPerHead).

    A traced graph keeps only the branches the example took; shape comparisons such as
    "is this map already the target size?" are not kept as conditions. Tracing where no grid
    equals a pooled size keeps the general branch, which is also right where they are equal.
    """
    grid = 2
    for m in model.modules():
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size
            sizes = (size,) if isinstance(size, int) else tuple(s for s in size if s is not None)
            grid = max(grid, *(s + 1 for s in sizes))
    return _total_stride(model) * (grid - 1) + 1


def _parameter(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model has no parameters to export")
    return p


class AdaptiveAvgPoolByMatrices(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two matrix products, y = P_h · x · P_wᵀ, for export.

    torch.onnx traces adaptive average pooling into gathers whose indices are fixed at the
    traced size: at any other size the graph fails or reads wrong bins. Here the bin bounds
    (PyTorch's: ⌊i·n/m⌋ to ⌈(i+1)·n/m⌉) are computed from the input's size inside the graph.
    x: (B, C, h, w) → (B, C, m_h, m_w).
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = _pair(output_size, "output_size")

    @staticmethod
    def _bins(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
        """(out, size) matrix averaging each of the ``out`` adaptive bins."""
        i = torch.arange(out, device=like.device)
        start = torch.div(i * size, out, rounding_mode="floor")
        end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
        j = torch.arange(size, device=like.device)
        inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
        return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._bins(x.shape[-2], self.output_size[0], x)
        cols = self._bins(x.shape[-1], self.output_size[1], x)
        return rows @ x @ cols.transpose(0, 1)


@contextlib.contextmanager
def _size_general_pooling(model: nn.Module) -> Iterator[None]:
    """Swap every nn.AdaptiveAvgPool2d with a fixed output size (UPerHead's pyramid pooling)
    for :class:`AdaptiveAvgPoolByMatrices` while tracing; the originals are put back."""
    swapped = []
    for name, module in list(model.named_modules()):
        size = getattr(module, "output_size", None)
        fixed = isinstance(size, int) or (
            isinstance(size, tuple) and all(isinstance(s, int) for s in size)
        )
        if isinstance(module, nn.AdaptiveAvgPool2d) and fixed and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, AdaptiveAvgPoolByMatrices(size))
            swapped.append((parent, child, module))
    try:
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def onnx_output_names(
    model: nn.Module, outputs: torch.Tensor | Sequence[torch.Tensor]
) -> list[str]:
    """Names of the graph's outputs: "logits" for a classifier or segmentation model,
    "stage{i}" per ``out_indices`` entry of a features-only PPMA, else "output{n}"."""
    if isinstance(outputs, torch.Tensor):
        return ["logits"]
    indices = getattr(model, "out_indices", None)
    if getattr(model, "features_only", False) and indices is not None:
        if len(indices) == len(outputs):
            return [f"stage{i}" for i in indices]
    return [f"output{n}" for n in range(len(outputs))]


class OnnxExportError(RuntimeError):
    """The exported graph disagrees with the model it was traced from."""


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: int | Sequence[int] = 224,
    batch_size: int | None = None,
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    input_name: str = "image",
    output_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` (a PPMA classifier or backbone, a SegmentationModel, any module taking
    one (B, C, H, W) image batch) to the ONNX file ``path``; returns the path.

    input_size: the (height, width) of the traced example, or one int for both. With
        ``dynamic`` (default) the batch, height and width axes are free in the graph (named
        "batch", "height", "width"); sides below :func:`_min_traced_side` (65 for a PPMA
        classifier, 193 under UPerHead's pooling) are raised to it. Without, the graph fixes
        ``batch_size`` × C × input_size.
    batch_size: of the traced example; default 2 when dynamic (a batch of 1 would be traced
        as a constant), else 1.
    verify: when onnxruntime is installed, run the file at the traced size and (if dynamic)
        at a second one with other grid sizes, and raise :class:`OnnxExportError` if it
        differs from the model run in PyTorch by more than 1e-3 relative to the outputs' scale.
    output_names: default :func:`onnx_output_names`.
    metadata: strings stored in the file's ``metadata_props`` (e.g. class names as JSON).
    The model is traced in eval mode with the reference ppma_ops backend and left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example = _traced_example(model, input_size, batch_size, dynamic)
    if not isinstance(opset, int) or opset < 17:
        raise ValueError(f"opset must be an int >= 17 (LayerNormalization), got {opset!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {path} is a directory; give the .onnx file to write")
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"metadata must map str to str; not so for {bad}")
    _require("onnx", "onnxscript")
    with (
        _eval_mode(model),
        _size_general_pooling(model),
        ppma_ops.use_backend("reference"),
        torch.no_grad(),
    ):
        if output_names is None:
            output_names = onnx_output_names(model, model(example))
        dims = {axis: torch.export.Dim.DYNAMIC for axis in _DYNAMIC_NAMES}
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[input_name],
            output_names=list(output_names),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=(dims,) if dynamic else None,
            verbose=False,
        )
    if dynamic:
        _name_dynamic_axes(program.model)
    program.model.metadata_props.update(metadata)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _SINGLE_FILE_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=big)
    if verify and importlib.util.find_spec("onnxruntime") is not None:
        height, width = example.shape[-2:]
        sizes = [(height, width)]
        if dynamic:  # other grid sizes at every stage
            stride = _total_stride(model)
            sizes.append((height + stride + 1, width + 2 * stride - 1))
        _verify(path, model, sizes, batch_size=1 if dynamic else example.shape[0])
    return path


def _traced_example(
    model: nn.Module, input_size: int | Sequence[int], batch_size: int | None, dynamic: bool
) -> torch.Tensor:
    """The random (B, C, H, W) input to trace, in the model's device and dtype."""
    height, width = _pair(input_size, "input_size")
    if batch_size is None:
        batch_size = 2 if dynamic else 1
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if dynamic:
        side = _min_traced_side(model)
        height, width, batch_size = max(height, side), max(width, side), max(batch_size, 2)
    weight = _parameter(model)
    in_chans = int(getattr(model, "in_chans", 3))
    example = torch.randn(batch_size, in_chans, height, width, device=weight.device)
    return example.to(weight.dtype)


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs the Python package(s) {missing} (pip install {' '.join(missing)})"
        )


def _name_dynamic_axes(model) -> None:
    """Give the exporter's symbolic sizes of the input (s0, s53, ...) readable names,
    everywhere they appear, so outputs show e.g. ("batch", "classes")."""
    import onnx_ir as ir

    graph = model.graph
    renames = {}
    for axis, name in _DYNAMIC_NAMES.items():
        dim = graph.inputs[0].shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            renames[dim.value] = name
    if not renames:
        return
    # Whole symbols only: "s5" must not match inside "s53".
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")

    def rename(d):
        if isinstance(d, ir.SymbolicDim) and d.value is not None:
            return ir.SymbolicDim(pattern.sub(lambda m: renames[m.group(1)], d.value))
        return d

    values = [*graph.inputs, *graph.outputs]
    values += [v for node in graph for v in node.outputs]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([rename(d) for d in value.shape])


def _verify(path: Path, model: nn.Module, sizes: list[tuple[int, int]], *, batch_size: int) -> None:
    for size, (error, scale) in _compare(path, model, sizes, batch_size, seed=0).items():
        if not error <= 1e-3 * scale:  # also catches NaN
            raise OnnxExportError(
                f"{path}: at input size {size} the ONNX graph differs from the model by "
                f"{error:.3g} (outputs up to {scale:.3g}); the trace did not generalise, "
                "try another input_size or dynamic=False"
            )


def _compare(
    path: str | os.PathLike,
    model: nn.Module,
    sizes: Sequence[int | Sequence[int]],
    batch_size: int,
    seed: int,
) -> dict[tuple[int, int], tuple[float, float]]:
    """{(H, W): (max |ONNX − PyTorch|, max(1, max |PyTorch|))} on seeded random inputs."""
    _require("onnxruntime")
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    weight = _parameter(model)
    generator = torch.Generator().manual_seed(seed)
    in_chans = int(getattr(model, "in_chans", 3))
    results = {}
    for size in sizes:
        height, width = _pair(size, "input_sizes entry")
        x = torch.randn(batch_size, in_chans, height, width, generator=generator)
        with _eval_mode(model), torch.no_grad():
            expected = model(x.to(weight.device, weight.dtype))
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        try:
            got = session.run(None, {input_name: x.numpy()})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise OnnxExportError(
                f"{path}: onnxruntime failed at input size {(height, width)}: {exc}"
            ) from exc
        if len(got) != len(expected):
            raise ValueError(f"{path}: {len(got)} outputs, the model gives {len(expected)}")
        pairs = [(g, e.float().cpu().numpy()) for g, e in zip(got, expected, strict=True)]
        if any(g.shape != e.shape for g, e in pairs):
            shapes = [(g.shape, e.shape) for g, e in pairs]
            raise OnnxExportError(f"{path}: output shapes (ONNX, PyTorch) differ: {shapes}")
        error = max(float(np.abs(g - e).max()) for g, e in pairs)
        scale = max([1.0] + [float(np.abs(e).max()) for _, e in pairs])
        results[(height, width)] = (error, scale)
    return results


def check_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    input_sizes: Sequence[int | Sequence[int]],
    *,
    batch_size: int = 2,
    seed: int = 0,
) -> dict[tuple[int, int], float]:
    """Run the ONNX file in onnxruntime (CPU) and ``model`` in PyTorch on the same random
    (batch_size, C, H, W) inputs, one per entry of ``input_sizes``.

    Returns {(H, W): max |ONNX − PyTorch| over all outputs}. PyTorch runs with whichever
    ppma_ops backend is selected (native by default), in eval mode; inputs are float32 on
    the CPU, moved to the model's device and dtype.
    """
    results = _compare(path, model, input_sizes, batch_size, seed)
    return {size: error for size, (error, _) in results.items()}
