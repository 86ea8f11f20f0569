"""Pictures of the mask: what one query sees, and the matrices of Theorem 1.

query_masks.png: the row of the mask belonging to one query token, drawn on the H×W grid, for
random decays (top) and constant decays (bottom, the Manhattan mask), for the two polylines and
their sum (in the spirit of the paper's Figs. 3 and 6).

factor_matrices.png: on a small grid, L_H (block diagonal), L_V (one H×H block per column,
interleaved), L = L_H·L_V and Lᵀ = L_V·L_H as N×N images; structural zeros are left white.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ppma_mask.factors import factors
from ppma_mask.mask import polyline_mask


@dataclass(frozen=True)
class FiguresConfig:
    height: int = 14
    width: int = 14
    query: tuple[int, int] = (4, 9)
    constant_decay: float = 0.8
    decay_range: tuple[float, float] = (0.35, 0.99)  # random decays, uniform in this interval
    factor_grid: tuple[int, int] = (4, 5)  # small grid for the N×N matrix images
    seed: int = 0


def random_log_decays(shape: tuple[int, int], decay_range, rng: np.random.Generator):
    return np.log(rng.uniform(*decay_range, shape)), np.log(rng.uniform(*decay_range, shape))


def query_masks(config: FiguresConfig, path: Path) -> None:
    from ppma_mask.experiments.plotting import pyplot

    plt = pyplot()
    rng = np.random.default_rng(config.seed)
    shape = (config.height, config.width)
    inputs = {
        "random decays": random_log_decays(shape, config.decay_range, rng),
        f"constant decays α = β = {config.constant_decay:g}": (
            np.full(shape, np.log(config.constant_decay)),
            np.full(shape, np.log(config.constant_decay)),
        ),
    }
    titles = {
        "v2h": "L (vertical, then horizontal)",
        "h2v": "Lᵀ (horizontal, then vertical)",
        "sum": "L + Lᵀ",
    }
    qi, qj = config.query
    u = qi * config.width + qj
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.4), dpi=110)
    for row, (name, (log_alpha, log_beta)) in enumerate(inputs.items()):
        for col, path_name in enumerate(("v2h", "h2v", "sum")):
            seen = polyline_mask(log_alpha, log_beta, path_name)[u].reshape(shape)
            ax = axes[row, col]
            image = ax.imshow(seen, cmap="viridis", vmin=0.0)
            ax.plot(qj, qi, marker="*", color="red", markersize=12)
            ax.set_title(f"{titles[path_name]}\n{name}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(
        f"Mask row of query (i, j) = ({qi}, {qj}) (red star) on a "
        f"{config.height}×{config.width} grid: weight given to every key (k, l)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def factor_matrices(config: FiguresConfig, path: Path) -> None:
    from ppma_mask.experiments.plotting import pyplot

    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    rng = np.random.default_rng(config.seed + 1)
    log_alpha, log_beta = random_log_decays(config.factor_grid, config.decay_range, rng)
    l_h, l_v = factors(log_alpha, log_beta)
    panels = {
        "L_H = blockdiag(A_i)": l_h.toarray(),
        "L_V = [δ_jl B_l(i, k)]": l_v.toarray(),
        "L = L_H · L_V": polyline_mask(log_alpha, log_beta, "v2h"),
        "Lᵀ = L_V · L_H": polyline_mask(log_alpha, log_beta, "h2v"),
    }
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6), dpi=110, layout="constrained")
    for ax, (title, matrix) in zip(axes, panels.items(), strict=True):
        image = ax.imshow(np.ma.masked_equal(matrix, 0.0), cmap="magma_r", vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key token k·W + l")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("query token i·W + j")
    fig.colorbar(image, ax=axes, fraction=0.015, pad=0.02)
    height, width = config.factor_grid
    fig.suptitle(
        f"Theorem 1 on a {height}×{width} grid (N = {height * width}); white = structural zero",
        fontsize=10,
    )
    fig.savefig(path)
    plt.close(fig)


def run(config: FiguresConfig, out: Path, progress=print) -> list[Path]:
    """Draw both figures into ``out`` and record the settings in figures.json."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "query_masks.png", out / "factor_matrices.png", out / "figures.json"]
    query_masks(config, written[0])
    factor_matrices(config, written[1])
    written[2].write_text(json.dumps(asdict(config), indent=2) + "\n")
    progress("wrote " + ", ".join(str(p) for p in written))
    return written
