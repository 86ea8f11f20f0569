"""Rotary position embedding over the flattened row-major token index (docs/design.md §2.2).

Despite the "2D" name upstream, token (i, j) of an H×W grid is rotated by the angle
u·θ_m with u = i·W + j, θ_m = 1 / 10000^{m/(d/2 − 1)} (m = 0..d/2−1), each θ_m used for one
interleaved pair (x_{2m}, x_{2m+1}) ("rotate every two").
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def rotary_frequencies(head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """θ repeated per interleaved pair: shape (head_dim,), [θ_0, θ_0, θ_1, θ_1, ...]."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary pairs, got {head_dim}")
    theta = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2, dtype=dtype))
    return theta.repeat_interleave(2)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x_0, x_1, x_2, x_3, ...) → (−x_1, x_0, −x_3, x_2, ...) along the last dim."""
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _is_dense(x: torch.Tensor) -> bool:
    """True when x's elements fill its storage span exactly once (a permuted contiguous
    tensor, for instance), so a tensor with x's strides can be allocated and written."""
    dims = sorted((st, n) for st, n in zip(x.stride(), x.shape, strict=True) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


class _ComplexRotate(torch.autograd.Function):
    """y = rotation · x on complex pairs, written to a fresh contiguous tensor.

    Reading a strided x (e.g. heads split out of a channels-last projection) and writing
    contiguously does the layout change the attention kernels need in the same pass. The
    backward does the reverse: it writes the gradient in x's own layout, so the gradient of
    the projection that produced x needs no further copy.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        out = torch.empty(pairs.shape, dtype=pairs.dtype, device=pairs.device)
        torch.mul(pairs, rotation, out=out)
        ctx.save_for_backward(rotation)
        ctx.x_layout = (x.shape, x.stride() if _is_dense(x) else None)
        return torch.view_as_real(out).flatten(-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rotation,) = ctx.saved_tensors
        shape, stride = ctx.x_layout
        if stride is None:
            grad_x = torch.empty(shape, dtype=grad.dtype, device=grad.device)
        else:
            grad_x = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device)
        # Multiplication by r is a real-linear map whose adjoint is multiplication by conj(r).
        pairs = torch.view_as_complex(grad.contiguous().unflatten(-1, (-1, 2)))
        out = torch.view_as_complex(grad_x.unflatten(-1, (-1, 2)))
        torch.mul(pairs, rotation.conj(), out=out)
        return grad_x, None


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate x (…, H, W, d) by the complex numbers ``rotation`` (H, W, d/2).

    Pair (x_2m, x_2m+1) is read as x_2m + i·x_2m+1 and multiplied by rotation[..., m]:
    (x_2m·cos − x_2m+1·sin, x_2m+1·cos + x_2m·sin), the upstream rotate-every-two formula.
    One complex multiply is ~10× faster than the gather/stack form on the CPU, and its
    result is contiguous whatever the layout of x. bf16/fp16 (no complex counterpart on every
    backend) and torch.compile (Inductor generates no code for complex tensors, but fuses the
    real-valued form into one kernel) use the real-valued form; compiled, it is asked for a
    contiguous result too, which that kernel then writes directly.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and x.dtype in (torch.float32, torch.float64) and x.stride(-1) == 1:
        complex_dtype = torch.complex64 if x.dtype == torch.float32 else torch.complex128
        return _ComplexRotate.apply(x, rotation.to(complex_dtype))
    cos = rotation.real.repeat_interleave(2, dim=-1).to(x.dtype)
    sin = rotation.imag.repeat_interleave(2, dim=-1).to(x.dtype)
    y = x * cos + rotate_every_two(x) * sin
    return y.contiguous() if compiling else y


class FlatRotaryEmbedding(nn.Module):
    """The rotation table exp(i·u·θ_m), shape (H, W, d/2), of the flat-index rotary embedding.

    Angles are computed in float32 (float64 for float64 models), as upstream; the table is
    complex64 (complex128). A small LRU cache keyed on (H, W, device, dtype) avoids
    recomputing it for every stage call at a fixed input size.
    """

    def __init__(self, head_dim: int, cache_size: int = 8) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"

    def _compute(
        self, height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        theta = rotary_frequencies(self.head_dim, acc)[0::2].to(device)
        index = torch.arange(height * width, device=device, dtype=acc)
        angle = (index[:, None] * theta[None, :]).reshape(height, width, self.head_dim // 2)
        return torch.complex(angle.cos(), angle.sin())

    def forward(
        self, height: int, width: int, *, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The complex rotation table (H, W, head_dim/2) for an H×W grid."""
        if torch.compiler.is_compiling() or device.type == "meta":
            return self._compute(height, width, device, dtype)
        key = (height, width, device, dtype)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        tables = self._compute(height, width, device, dtype)
        self._cache[key] = tables
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tables
