"""What a PPMA model attends to, for one query pixel (docs/design.md §7.2).

For each chosen attention layer and head, :func:`explain` returns, on that layer's token grid:

* the decay maps α = exp(log_alpha) (horizontal) and β = exp(log_beta) (vertical) (§2.1);
* the polyline mask the query token u sees: row u of L (the "v2h" path: along the key's
  column, then along the query's row), row u of Lᵀ (the "h2v" path) and their average,
  ½·(L + Lᵀ)[u] — the masks of the two softmaxes of a vanilla stage (§2.3), and the
  structures of a criss-cross stage's two orders (§2.4);
* the query's attention map: the weights its output gives every token's value, i.e. row u of
  ½·softmax(S + M) + ½·softmax(S + Mᵀ) (vanilla) or of the composed row/column operator
  ½·Cc∘R + ½·R∘Cc (criss-cross). Each map sums to 1.

Attention layers are found by type (:class:`~ppma_models.attention.MaskedAttention`), so
classifiers, features-only backbones and segmentation models all work, whatever ppma_ops
backend runs. :func:`write_explanation_png` draws the maps over the image (matplotlib needed);
:meth:`Explanation.save_npz` keeps the raw arrays.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attention import CrissCrossAttention, MaskedAttention, PolylineAttention
from .rope import apply_rotary

__all__ = [
    "Explanation",
    "LayerExplanation",
    "explain",
    "query_attention",
    "query_masks",
    "write_explanation_png",
]

_LAYER_NAME = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.attn$")


@dataclass
class LayerExplanation:
    """One attention layer's maps for the query. Arrays are (heads, h, w) on its token grid."""

    name: str  # module name, e.g. "stages.2.blocks.7.attn"
    stage: int
    block: int
    kind: str  # "V" (vanilla) or "X" (criss-cross)
    query: tuple[int, int]  # the query token (i, j) on this grid
    log_alpha: np.ndarray
    log_beta: np.ndarray
    mask_v2h: np.ndarray  # L[u, :]
    mask_h2v: np.ndarray  # Lᵀ[u, :]
    attention: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.log_alpha.shape[1:])

    @property
    def heads(self) -> int:
        return self.log_alpha.shape[0]

    @property
    def alpha(self) -> np.ndarray:
        return np.exp(self.log_alpha)

    @property
    def beta(self) -> np.ndarray:
        return np.exp(self.log_beta)

    @property
    def mask_mean(self) -> np.ndarray:
        """½·(L + Lᵀ)[u, :], the average of the two paths."""
        return 0.5 * (self.mask_v2h + self.mask_h2v)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "log_alpha": self.log_alpha,
            "log_beta": self.log_beta,
            "alpha": self.alpha,
            "beta": self.beta,
            "mask_v2h": self.mask_v2h,
            "mask_h2v": self.mask_h2v,
            "mask_mean": self.mask_mean,
            "attention": self.attention,
            "query": np.array(self.query),
        }


@dataclass
class Explanation:
    """The maps of every explained layer for one image and query pixel.

    image: (H, W, 3) floats in [0, 1], what the pictures are drawn over; pixel: the query
    (row, column) in it; output: the model's output for the image (logits; the first map
    for a backbone), batch dimension removed.
    """

    image: np.ndarray
    pixel: tuple[int, int]
    output: np.ndarray
    layers: list[LayerExplanation] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat dict for ``np.savez``: "image", "pixel", "output", and per layer
        "stage{s}/block{b}/{alpha, beta, log_alpha, log_beta, mask_v2h, mask_h2v,
        mask_mean, attention, query}"."""
        out = {"image": self.image, "pixel": np.array(self.pixel), "output": self.output}
        for layer in self.layers:
            prefix = f"stage{layer.stage}/block{layer.block}/"
            out.update({prefix + k: v for k, v in layer.arrays().items()})
        return out

    def save_npz(self, path: str | os.PathLike, **extra: np.ndarray) -> Path:
        """Write :meth:`arrays` (and any ``extra`` arrays) as a compressed .npz file."""
        path = Path(path)
        clash = sorted(set(extra) & set(self.arrays()))
        if clash:
            raise ValueError(f"extra arrays {clash} would replace the explanation's own")
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.arrays(), **extra)
        path.write_bytes(buf.getvalue())
        return path


# ------------------------------------------------------------------------------------- maths
def _line_tables(log_decay: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative sums of the finite log decays along ``dim`` and running counts of the −inf
    ones (blocked steps), each line's first entry left out (it never enters the mask, §1)."""
    t = log_decay.to(torch.float64)
    first = torch.zeros_like(t, dtype=torch.bool)
    first.select(dim, 0).fill_(True)
    blocked = torch.isneginf(t) & ~first
    finite = t.masked_fill(blocked | first, 0.0)
    return finite.cumsum(dim), blocked.to(torch.float64).cumsum(dim)


def _leg(c: torch.Tensor, n: torch.Tensor, c0: torch.Tensor, n0: torch.Tensor) -> torch.Tensor:
    """log of one leg of a path: −|c − c0|, −inf where a blocked step lies between."""
    return (-(c - c0).abs()).masked_fill(n != n0, float("-inf"))


def query_masks(
    log_alpha: torch.Tensor, log_beta: torch.Tensor, query: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log polyline masks seen by query token (i, j): log L[u, :] and log Lᵀ[u, :].

    log_alpha, log_beta: (heads, h, w), ≤ 0 (−inf blocks a step). Returns two (heads, h, w)
    float64 tensors indexed by the key (k, l):
    v2h: −|Ca[i,j] − Ca[i,l]| − |Cb[i,l] − Cb[k,l]| (up the key's column, along row i);
    h2v: −|Ca[k,l] − Ca[k,j]| − |Cb[k,j] − Cb[i,j]| (along the key's row, up column j).
    """
    i, j = query
    ca, na = _line_tables(log_alpha, -1)
    cb, nb = _line_tables(log_beta, -2)
    along_row_i = _leg(ca[:, i, :], na[:, i, :], ca[:, i, j, None], na[:, i, j, None])  # (h', w)
    up_columns = _leg(cb, nb, cb[:, i : i + 1, :], nb[:, i : i + 1, :])  # (h', h, w)
    v2h = along_row_i[:, None, :] + up_columns
    along_rows = _leg(ca, na, ca[:, :, j : j + 1], na[:, :, j : j + 1])  # (h', h, w)
    up_column_j = _leg(cb[:, :, j], nb[:, :, j], cb[:, i, j, None], nb[:, i, j, None])  # (h', h)
    h2v = along_rows + up_column_j[:, :, None]
    return v2h, h2v


def query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    query: tuple[int, int],
    kind: str,
) -> torch.Tensor:
    """The weights the query token's output gives each token's value: (heads, h, w), sum 1.

    q, k: (heads, h, w, d) after rotary embedding, with the softmax scale already in k (as the
    attention layers pass them to ppma_ops, scale=1); log decays (heads, h, w); kind "V" or "X".
    """
    i, j = query
    q, k = q.to(torch.float64), k.to(torch.float64)
    if kind == "V":
        v2h, h2v = query_masks(log_alpha, log_beta, query)
        s = torch.einsum("hd,hkld->hkl", q[:, i, j], k).flatten(1)
        attn = 0.5 * torch.softmax(s + v2h.flatten(1), -1) + 0.5 * torch.softmax(
            s + h2v.flatten(1), -1
        )
        return attn.view_as(v2h)
    if kind != "X":
        raise ValueError(f"kind must be 'V' or 'X', got {kind!r}")
    ca, na = _line_tables(log_alpha, -1)
    cb, nb = _line_tables(log_beta, -2)
    # R: row r's softmax for the query column j, for every row r → (heads, h, w) over (r, l).
    rows_j = torch.softmax(
        torch.einsum("hrd,hrld->hrl", q[:, :, j], k)
        + _leg(ca, na, ca[:, :, j : j + 1], na[:, :, j : j + 1]),
        -1,
    )
    # Cc: column l's softmax for the query row i, for every column l → (heads, h, w) over (k, l).
    cols_i = torch.softmax(
        torch.einsum("hld,hkld->hkl", q[:, i], k)
        + _leg(cb, nb, cb[:, i : i + 1, :], nb[:, i : i + 1, :]),
        1,
    )
    # Cc(R(V)) at (i, j) = Σ_k colsoftmax_j[i, k] · Σ_l rowsoftmax_k[j, l] · V[k, l], and
    # R(Cc(V)) at (i, j) = Σ_l rowsoftmax_i[j, l] · Σ_k colsoftmax_l[i, k] · V[k, l].
    rows_then_cols = cols_i[:, :, j : j + 1] * rows_j
    cols_then_rows = rows_j[:, i : i + 1, :] * cols_i
    return 0.5 * rows_then_cols + 0.5 * cols_then_rows


# ------------------------------------------------------------------------------ model hooks
def _queries_keys(
    module: MaskedAttention, x: torch.Tensor, rotation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the layer hands them to its operator: (B, heads, h, w, d) each (§2.2)."""
    q = apply_rotary(module._split_heads(module.q_proj(x)), rotation)
    k = apply_rotary(module._split_heads(module.k_proj(x)), rotation * module.head_dim**-0.5)
    return q, k


def _layer_kind(module: MaskedAttention) -> str:
    if isinstance(module, PolylineAttention):
        return "V"
    if isinstance(module, CrissCrossAttention):
        return "X"
    raise TypeError(f"unknown attention layer type {type(module).__name__}")


def _select_layers(model: nn.Module, layers: str | Sequence[str]) -> dict[str, MaskedAttention]:
    """{name: attention layer}: the last block of each stage, all, or the named ones."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, MaskedAttention)}
    if not found:
        raise ValueError("model has no PPMA attention layers to explain")
    if layers == "all":
        return found
    if layers == "last":
        last: dict[str, str] = {}
        for name in found:  # named_modules is in forward order: later blocks overwrite
            last[name.rsplit(".blocks.", 1)[0]] = name
        return {n: found[n] for n in last.values()}
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'last', 'all' or a list of names, got {layers!r}")
    missing = [n for n in layers if n not in found]
    if missing:
        raise ValueError(f"layers {missing} are not attention layers; choose from {list(found)}")
    return {n: found[n] for n in layers}


def _display_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) model input → (H, W, 3) in [0, 1], each channel min-max stretched."""
    img = x.detach().to("cpu", torch.float64)
    lo = img.amin(dim=(1, 2), keepdim=True)
    hi = img.amax(dim=(1, 2), keepdim=True)
    img = ((img - lo) / (hi - lo).clamp_min(1e-12)).permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]


def _token(pixel: tuple[int, int], image_size: tuple[int, int], grid: tuple[int, int]):
    """The token of an h×w grid whose cell of the evenly split image holds the pixel."""
    return tuple(min(g - 1, p * g // s) for p, s, g in zip(pixel, image_size, grid, strict=True))


def _check_pixel(pixel: Sequence[int] | None, size: tuple[int, int]) -> tuple[int, int]:
    if pixel is None:
        return size[0] // 2, size[1] // 2
    row, col = (int(p) for p in pixel)
    if not (0 <= row < size[0] and 0 <= col < size[1]):
        raise ValueError(f"pixel {tuple(pixel)} lies outside the {size[0]}x{size[1]} input")
    return row, col


@torch.no_grad()
def explain(
    model: nn.Module,
    image: torch.Tensor,
    *,
    pixel: Sequence[int] | None = None,
    layers: str | Sequence[str] = "last",
    display: np.ndarray | None = None,
) -> Explanation:
    """Decay maps, polyline masks and attention maps for the query at ``pixel``.

    image: the model input, (C, H, W) or (1, C, H, W), already normalised.
    pixel: (row, column) in the input; default its centre. Each layer's query token is the
        token whose cell of the evenly divided input holds the pixel.
    layers: "last" (the last block of every stage, default), "all", or attention module
        names such as "stages.2.blocks.7.attn".
    display: (H, W, 3) image in [0, 1] to draw over; default the input, min-max stretched.
    The model runs once in eval mode (restored afterwards).
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    size = tuple(image.shape[-2:])
    pixel = _check_pixel(pixel, size)
    chosen = _select_layers(model, layers)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            captured[name] = (args[0].detach(), args[1].detach())

        return hook

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in chosen.items()]
    was_training = model.training
    try:
        model.eval()
        output = model(image)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    first = output if isinstance(output, torch.Tensor) else output[0]
    result = Explanation(
        image=_display_image(image[0]) if display is None else np.asarray(display, np.float64),
        pixel=pixel,
        output=first[0].detach().float().cpu().numpy(),
    )
    for name, module in chosen.items():
        result.layers.append(_explain_layer(name, module, *captured[name], pixel, size))
    return result


def _explain_layer(
    name: str,
    module: MaskedAttention,
    x: torch.Tensor,
    rotation: torch.Tensor,
    pixel: tuple[int, int],
    size: tuple[int, int],
) -> LayerExplanation:
    match = _LAYER_NAME.search(name)
    stage, block = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
    q, k = _queries_keys(module, x, rotation)
    log_alpha, log_beta = (t[0].double() for t in module.decay(x))
    token = _token(pixel, size, tuple(log_alpha.shape[1:]))
    kind = _layer_kind(module)
    v2h, h2v = query_masks(log_alpha, log_beta, token)
    attention = query_attention(q[0], k[0], log_alpha, log_beta, token, kind)
    return LayerExplanation(
        name=name,
        stage=stage,
        block=block,
        kind=kind,
        query=token,
        log_alpha=log_alpha.cpu().numpy(),
        log_beta=log_beta.cpu().numpy(),
        mask_v2h=v2h.exp().cpu().numpy(),
        mask_h2v=h2v.exp().cpu().numpy(),
        attention=attention.cpu().numpy(),
    )


# --------------------------------------------------------------------------------- pictures
#: The columns of the picture grid, left to right.
PANELS = (
    "input",
    "α horizontal decay",
    "β vertical decay",
    "mask L (v2h)",
    "mask Lᵀ (h2v)",
    "mask ½(L + Lᵀ)",
    "attention",
)


def _figure(rows: int, panel_inches: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "write_explanation_png needs matplotlib (pip install matplotlib)"
        ) from exc
    fig = Figure(figsize=(len(PANELS) * panel_inches, rows * panel_inches + 0.4))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, len(PANELS), squeeze=False)


def _panel_maps(
    layer: LayerExplanation, head: int
) -> list[tuple[np.ndarray, str, str, float, float]]:
    """(map, colormap, title, vmin, vmax) for the six map columns of one row."""
    alpha, beta, attention = layer.alpha[head], layer.beta[head], layer.attention[head]
    masks = (layer.mask_v2h[head], layer.mask_h2v[head], layer.mask_mean[head])
    out = [
        (alpha, "viridis", f"α {alpha.min():.3f}–{alpha.max():.3f}", alpha.min(), alpha.max()),
        (beta, "viridis", f"β {beta.min():.3f}–{beta.max():.3f}", beta.min(), beta.max()),
    ]
    # One range for the three masks of a row, so that the paths compare at a glance.
    lo, hi = min(m.min() for m in masks), max(m.max() for m in masks)
    names = ("L", "Lᵀ", "½(L + Lᵀ)")
    out += [
        (m, "magma", f"{n} {lo:.3f}–{hi:.3f}", lo, hi) for m, n in zip(masks, names, strict=True)
    ]
    out.append((attention, "inferno", f"attention ≤ {attention.max():.3f}", 0.0, attention.max()))
    return out


def write_explanation_png(
    explanation: Explanation,
    path: str | os.PathLike,
    *,
    heads: Sequence[int] | None = None,
    panel_inches: float = 1.6,
    dpi: int = 100,
) -> Path:
    """One PNG grid: a row per (layer, head), the columns of :data:`PANELS`.

    Every map is stretched over the image (token cells split it evenly) and blended over a
    grey copy; + marks the query pixel. α and β use each panel's own range, the three masks
    of a row one shared range (printed in the titles: trained decays are often all close to
    1), attention [0, its maximum].
    heads: only these head indices (default all). Needs matplotlib.
    """
    rows = [
        (layer, h)
        for layer in explanation.layers
        for h in range(layer.heads)
        if heads is None or h in heads
    ]
    if not rows:
        raise ValueError(f"nothing to draw: no layer has heads {list(heads or [])}")
    image = np.clip(explanation.image, 0.0, 1.0)
    grey = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    row_px, col_px = explanation.pixel
    fig, axes = _figure(len(rows), panel_inches)
    for r, (layer, head) in enumerate(rows):
        axes[r, 0].imshow(image, extent=extent)
        axes[r, 0].set_ylabel(
            f"stage {layer.stage} block {layer.block}\n{layer.kind} · head {head}", fontsize=7
        )
        for c, (values, cmap, title, lo, hi) in enumerate(_panel_maps(layer, head), start=1):
            ax = axes[r, c]
            ax.imshow(grey, extent=extent)
            ax.imshow(
                values, cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-12), alpha=0.75, extent=extent,
                interpolation="nearest",
            )  # fmt: skip
            ax.set_title(f"{PANELS[c]}\n{title}" if r == 0 else title, fontsize=6)
        for ax in axes[r]:
            ax.plot(col_px, row_px, "+", color="cyan", markersize=6, markeredgewidth=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title(f"input, query {explanation.pixel}", fontsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    path = Path(path)
    path.write_bytes(buf.getvalue())
    return path
