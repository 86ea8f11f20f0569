"""How the cost of y = L·x grows with the number of tokens N, for the three methods.

Every method is timed end to end on the same inputs: it receives the (H, W) log decays and x
(N, C) and returns y, so mask construction is included for all of them (the dense method builds
the N×N mask, the factored one the H + W 1-D masks, the scan builds nothing). That is the cost a
caller pays who starts from decays, which is how the models use the mask.

Timing: for each grid size the methods run interleaved (one sample of each in turn, rotating the
order), each sample repeats the call until it lasts at least ``min_sample_s`` so that microsecond
calls are not lost in timer noise, and the median over ``repeats`` samples is reported.

Clock: by default the process CPU time (``time.process_time``), with BLAS pinned to one thread by
the command line. On a shared machine wall time also counts the time the process waits for a
core, which varies with everyone else's load and says nothing about the algorithm; CPU time of a
single-threaded process does not (cache and memory-bandwidth contention still show). Wall-clock
medians are recorded next to it in the JSON (``clock="wall"`` reports those instead).

Slopes are least-squares fits of log(time) against log(N) over the sizes with side ≥
``fit_min_side``: below that, fixed per-call costs (argument checks, allocation, Python loop
steps) are a large share of the time and flatten the curve.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ppma_mask.mask import polyline_mask
from ppma_mask.product import apply_mask
from ppma_mask.validation import METHODS

DEFAULT_SIDES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
THEORY_EXPONENT = {"dense": 2.0, "factored": 1.5, "scan": 1.0}


@dataclass(frozen=True)
class ScalingConfig:
    """What to measure; the defaults are what the README's table reports."""

    sides: tuple[int, ...] = DEFAULT_SIDES
    max_side: dict[str, int] = field(
        default_factory=lambda: {"dense": 96, "factored": 256, "scan": 512}
    )
    channels: int = 16
    path: str = "v2h"
    repeats: int = 9
    min_sample_s: float = 0.02
    fit_min_side: int = 32
    clock: str = "cpu"  # "cpu" (process CPU time) or "wall" (perf_counter)
    seed: int = 0
    blas_threads: int = 0  # what the command line pinned (0: not pinned); recorded only


def random_inputs(side: int, channels: int, rng: np.random.Generator):
    """Log decays with decays in [0.5, 0.999] (a typical trained range) and standard-normal x."""
    log_alpha = np.log(rng.uniform(0.5, 0.999, (side, side)))
    log_beta = np.log(rng.uniform(0.5, 0.999, (side, side)))
    x = rng.standard_normal((side * side, channels))
    return log_alpha, log_beta, x


CLOCKS = ("cpu", "wall")


def _sample(call, min_sample_s: float, clock: str) -> dict[str, float]:
    """One sample: repeat ``call`` until ``clock`` has advanced min_sample_s; seconds per call
    on both clocks, and the number of calls."""
    number = 0
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    while True:
        call()
        number += 1
        wall = time.perf_counter() - wall_start
        cpu = time.process_time() - cpu_start
        if (cpu if clock == "cpu" else wall) >= min_sample_s:
            return {"cpu": cpu / number, "wall": wall / number, "calls": number}


def _agreement(log_alpha, log_beta, x, path: str, methods: Sequence[str]) -> dict[str, float]:
    """Largest error of each method against the first one, relative to |L|·|x| (or to the
    largest |y| when the dense mask is not built)."""
    results = {m: apply_mask(log_alpha, log_beta, x, path=path, method=m) for m in methods}
    reference = results[methods[0]]
    if "dense" in methods:
        scale = polyline_mask(log_alpha, log_beta, path) @ np.abs(x)  # mask entries are > 0
    else:
        scale = np.full_like(reference, np.abs(reference).max())
    return {m: float(np.max(np.abs(results[m] - reference) / scale)) for m in methods[1:]} | {
        "reference": methods[0]
    }


def fit_slope(n_tokens: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of log time against log N."""
    slope, intercept = np.polyfit(np.log(n_tokens), np.log(seconds), 1)
    return float(slope), float(intercept)


def measure(config: ScalingConfig, progress=print) -> dict:
    """Run the timings; returns the JSON-ready record (config, rows, fits, agreement, machine)."""
    rng = np.random.default_rng(config.seed)
    rows: list[dict] = []
    agreement: list[dict] = []
    for side in config.sides:
        methods = [m for m in METHODS if side <= config.max_side[m]]
        if not methods:
            continue
        log_alpha, log_beta, x = random_inputs(side, config.channels, rng)
        agreement.append(
            {"side": side} | _agreement(log_alpha, log_beta, x, config.path, methods)
        )  # also the warm-up call of every method
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        for repeat in range(config.repeats):
            order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
            for method in order:
                call = partial(apply_mask, log_alpha, log_beta, x, config.path, method)
                samples[method].append(_sample(call, config.min_sample_s, config.clock))
        for method in methods:
            cpu = [sample["cpu"] for sample in samples[method]]
            wall = [sample["wall"] for sample in samples[method]]
            rows.append(
                {
                    "side": side,
                    "n_tokens": side * side,
                    "method": method,
                    "median_s": float(np.median(cpu if config.clock == "cpu" else wall)),
                    "median_cpu_s": float(np.median(cpu)),
                    "median_wall_s": float(np.median(wall)),
                    "samples_cpu_s": cpu,
                    "samples_wall_s": wall,
                    "calls_per_sample": [int(sample["calls"]) for sample in samples[method]],
                }
            )
        progress(
            f"{side:>4}x{side:<4} N={side * side:>7}  "
            + "  ".join(
                f"{r['method']} {r['median_s'] * 1e3:10.3f} ms" for r in rows[-len(methods) :]
            )
        )

    fits = {}
    for method in METHODS:
        points = [r for r in rows if r["method"] == method and r["side"] >= config.fit_min_side]
        if len(points) < 2:
            continue
        slope, intercept = fit_slope(
            [p["n_tokens"] for p in points], [p["median_s"] for p in points]
        )
        fits[method] = {
            "slope": slope,
            "intercept": intercept,
            "theory": THEORY_EXPONENT[method],
            "fit_sides": [p["side"] for p in points],
            # slope between neighbouring sizes: shows the approach to the asymptotic exponent
            "local_slopes": [
                {
                    "sides": [a["side"], b["side"]],
                    "slope": fit_slope(
                        [a["n_tokens"], b["n_tokens"]], [a["median_s"], b["median_s"]]
                    )[0],
                }
                for a, b in zip(points, points[1:], strict=False)
            ],
        }
    return {
        "experiment": "scaling of y = L x (apply_mask), time vs number of tokens N = side^2",
        "config": asdict(config),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "blas_threads_env": {
                name: os.environ.get(name)
                for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
            },
            "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "rows": rows,
        "fits": fits,
        "agreement": agreement,
    }


def markdown_table(record: dict) -> str:
    """The medians (ms) per size and method, and the fitted slopes, as a Markdown table."""
    config = record["config"]
    by_side: dict[int, dict[str, float]] = {}
    for row in record["rows"]:
        by_side.setdefault(row["side"], {})[row["method"]] = row["median_s"]
    lines = [
        f"Median {config['clock']} time of `apply_mask(..., path={config['path']!r}, method=...)` "
        f"in ms, C = {config['channels']} channels, float64 (decay inputs to result, mask "
        "building included).",
        "",
        "| grid | N | " + " | ".join(METHODS) + " |",
        "|---|---:|" + "---:|" * len(METHODS),
    ]
    for side, times in sorted(by_side.items()):
        cells = [f"{times[m] * 1e3:.3f}" if m in times else "–" for m in METHODS]
        lines.append(f"| {side}×{side} | {side * side} | " + " | ".join(cells) + " |")
    slopes = []
    for m in METHODS:
        fit = record["fits"].get(m)
        slopes.append(
            f"{fit['slope']:.2f} (sides {fit['fit_sides'][0]}–{fit['fit_sides'][-1]})"
            if fit
            else "–"
        )
    lines.append("| **fitted slope** | | " + " | ".join(slopes) + " |")
    lines.append("| theory | | " + " | ".join(f"{THEORY_EXPONENT[m]:g}" for m in METHODS) + " |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Log-log plot of the medians with the fitted lines."""
    from ppma_mask.experiments.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    colors = {"dense": "tab:red", "factored": "tab:blue", "scan": "tab:green"}
    for method in METHODS:
        points = [r for r in record["rows"] if r["method"] == method]
        if not points:
            continue
        n = np.array([p["n_tokens"] for p in points], dtype=float)
        t = np.array([p["median_s"] for p in points])
        fit = record["fits"].get(method)
        label = method + (f" (slope {fit['slope']:.2f})" if fit else "")
        ax.loglog(n, t, "o", color=colors[method], label=label)
        if fit:
            n_fit = np.array([s * s for s in fit["fit_sides"]], dtype=float)
            ax.loglog(
                n_fit,
                np.exp(fit["intercept"]) * n_fit ** fit["slope"],
                "-",
                color=colors[method],
                alpha=0.7,
            )
    ax.set_xlabel("tokens N = H·W (square grids)")
    ax.set_ylabel(f"median {record['config']['clock']} time per call [s]")
    config = record["config"]
    ax.set_title(
        f"y = L·x, C = {config['channels']}, path {config['path']}: dense O(N²), "
        "factored O(N^1.5), scan O(N)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(config: ScalingConfig, out: Path, progress=print) -> dict:
    """Measure, then write scaling.json, scaling.md and scaling.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    record = measure(config, progress)
    (out / "scaling.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "scaling.md").write_text(markdown_table(record))
    plot(record, out / "scaling.png")
    for method, fit in record["fits"].items():
        progress(f"fitted slope {method}: {fit['slope']:.3f} over sides {fit['fit_sides']}")
    progress(f"wrote {out / 'scaling.json'}, {out / 'scaling.md'}, {out / 'scaling.png'}")
    return record
