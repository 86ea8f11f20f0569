"""Command line: ``python -m ppma_mask.experiments {scaling,figures} --out DIR``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ppma_mask.experiments import figures, scaling
from ppma_mask.validation import METHODS, PATHS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _pair(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers like 4x5, got {text!r}")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ppma_mask.experiments",
        description="Theory experiments for the polyline path mask (float64 NumPy/SciPy).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    defaults = scaling.ScalingConfig()
    timing = commands.add_parser(
        "scaling",
        help="time y = L·x by the dense, factored and scan methods; fit log-log slopes",
        description=(
            "Times apply_mask with each method over growing square grids (build + product, "
            "interleaved, median of repeats), fits log(time) against log(N) over sides >= "
            "--fit-min-side and writes scaling.json, scaling.md and scaling.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    timing.add_argument("--out", type=Path, required=True, help="output directory")
    timing.add_argument(
        "--sides",
        type=_positive_int,
        nargs="+",
        default=list(defaults.sides),
        help="grid sides to try (square H = W grids)",
    )
    for method in METHODS:
        timing.add_argument(
            f"--max-{method}-side",
            type=_positive_int,
            default=defaults.max_side[method],
            help=f"largest side timed with method {method!r}",
        )
    timing.add_argument(
        "--channels", type=_positive_int, default=defaults.channels, help="columns C of x"
    )
    timing.add_argument("--path", choices=PATHS, default=defaults.path, help="which mask")
    timing.add_argument(
        "--repeats",
        type=_positive_int,
        default=defaults.repeats,
        help="samples per method and size (the median is reported)",
    )
    timing.add_argument(
        "--min-sample-s",
        type=float,
        default=defaults.min_sample_s,
        help="each sample repeats the call until it lasts this long",
    )
    timing.add_argument(
        "--fit-min-side",
        type=_positive_int,
        default=defaults.fit_min_side,
        help="fit slopes over sides >= this (smaller ones are overhead-bound)",
    )
    timing.add_argument(
        "--clock",
        choices=scaling.CLOCKS,
        default=defaults.clock,
        help="what to report and fit: process CPU time, or wall-clock time (both are recorded)",
    )
    timing.add_argument("--seed", type=int, default=defaults.seed, help="random inputs")
    timing.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="threads for BLAS (OpenBLAS/MKL/OpenMP), fixed before NumPy loads it by re-running "
        "the command; 1 times the algorithms rather than thread wake-ups on a busy machine; "
        "0 keeps the environment as it is",
    )

    fig_defaults = figures.FiguresConfig()
    drawing = commands.add_parser(
        "figures",
        help="draw the mask seen by one query and the matrices L, L_H, L_V",
        description=(
            "Writes query_masks.png (one query's mask row on the grid for random and constant "
            "decays, both polylines and their sum), factor_matrices.png (L_H, L_V, L, Lᵀ) and "
            "figures.json (the settings)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    drawing.add_argument("--out", type=Path, required=True, help="output directory")
    drawing.add_argument(
        "--grid",
        type=_pair,
        default=(fig_defaults.height, fig_defaults.width),
        help="H x W of the query-mask grid, e.g. 14x14",
    )
    drawing.add_argument(
        "--query",
        type=_pair,
        default=fig_defaults.query,
        help="query token i,j (0-based row, column)",
    )
    drawing.add_argument(
        "--constant-decay",
        type=float,
        default=fig_defaults.constant_decay,
        help="α = β for the constant-decay row, in (0, 1]",
    )
    drawing.add_argument(
        "--factor-grid",
        type=_pair,
        default=fig_defaults.factor_grid,
        help="H x W of the small grid for the N×N matrix images",
    )
    drawing.add_argument("--seed", type=int, default=fig_defaults.seed, help="random decays")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "scaling":
        config = scaling.ScalingConfig(
            sides=tuple(sorted(set(args.sides))),
            max_side={m: getattr(args, f"max_{m}_side") for m in METHODS},
            channels=args.channels,
            path=args.path,
            repeats=args.repeats,
            min_sample_s=args.min_sample_s,
            fit_min_side=args.fit_min_side,
            clock=args.clock,
            seed=args.seed,
            blas_threads=args.blas_threads,
        )
        scaling.run(config, args.out)
        return 0

    height, width = args.grid
    qi, qj = args.query
    if min(height, width, *args.factor_grid) < 1:
        parser.error("--grid and --factor-grid need positive sides")
    if not (0 <= qi < height and 0 <= qj < width):
        parser.error(f"--query {qi},{qj} lies outside the {height}x{width} grid")
    if not 0.0 < args.constant_decay <= 1.0:
        parser.error(f"--constant-decay must lie in (0, 1], got {args.constant_decay}")
    config = figures.FiguresConfig(
        height=height,
        width=width,
        query=(qi, qj),
        constant_decay=args.constant_decay,
        factor_grid=args.factor_grid,
        seed=args.seed,
    )
    figures.run(config, args.out)
    return 0


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def run_from_command_line(argv: Sequence[str]) -> int:
    """``main``, after pinning the BLAS thread count for ``scaling`` if asked to.

    BLAS reads its thread count once, when NumPy loads it, which has already happened by the
    time this module runs; so the command is started again with the variables set.
    """
    args = build_parser().parse_args(argv)
    if args.command == "scaling" and args.blas_threads > 0:
        wanted = str(args.blas_threads)
        if any(os.environ.get(name) != wanted for name in BLAS_THREAD_VARIABLES):
            environment = os.environ | dict.fromkeys(BLAS_THREAD_VARIABLES, wanted)
            command = [sys.executable, "-m", "ppma_mask.experiments", *argv]
            os.execve(sys.executable, command, environment)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run_from_command_line(sys.argv[1:]))
