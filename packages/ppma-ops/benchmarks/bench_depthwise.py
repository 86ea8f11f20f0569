"""Depthwise convolution benchmark of ppma_ops: run by `nox -s bench_depthwise`.

The native channels-last kernel (``ppma_ops.depthwise_conv2d``) against ``F.conv2d`` (oneDNN)
on the NCHW view of the same (B, H, W, C) maps, which is what the models ran before. Shapes
are the three depthwise convolutions of a PPMA block (CPE 3×3, LePE 5×5, the feed-forward's
3×3 on mlp_ratio·C channels) in each stage of PPMA-T at 224×224 (batch 16), of PPMA-T's first
stage at 512×512 (batch 2) and of the segmentation demo's model (batch 8). Calls are
interleaved round by round and medians reported (see bench_ops.interleaved_medians).

    python packages/ppma-ops/benchmarks/bench_depthwise.py --out benchmarks [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import ppma_ops
import torch
from bench_ops import interleaved_medians
from ppma_ops import _native, reference

MLP_RATIO = 3


def _block_convs(label: str, batch: int, side: int, dim: int) -> list[tuple]:
    return [
        (label, "CPE 3×3", batch, side, dim, 3),
        (label, "LePE 5×5", batch, side, dim, 5),
        (label, "FFN 3×3", batch, side, MLP_RATIO * dim, 3),
    ]


# (model/stage, conv, batch, H = W, C, k)
SHAPES = [
    *_block_convs("demo stage 1", 8, 16, 32),
    *_block_convs("demo stage 2", 8, 8, 64),
    *_block_convs("demo stage 3", 8, 4, 128),
    *_block_convs("PPMA-T 224 stage 1", 16, 56, 64),
    *_block_convs("PPMA-T 224 stage 2", 16, 28, 128),
    *_block_convs("PPMA-T 224 stage 3", 16, 14, 256),
    *_block_convs("PPMA-T 224 stage 4", 16, 7, 512),
    *_block_convs("PPMA-T 512 stage 1", 2, 128, 64),
]
QUICK_SHAPES = SHAPES[:3]


def bench_shape(label, conv, batch, side, channels, k) -> dict:
    gen = torch.Generator().manual_seed(side * channels + k)
    x = torch.randn(batch, side, side, channels, generator=gen)
    w = torch.randn(channels, 1, k, k, generator=gen)
    b = torch.randn(channels, generator=gen)
    impls = {"native": ppma_ops.depthwise_conv2d, "conv2d": reference.depthwise_conv2d}
    with torch.no_grad():
        fwd = interleaved_medians(
            {n: (lambda f=f: f(x, w, b)) for n, f in impls.items()}, min_rounds=5, budget_s=2.0
        )
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    grad = torch.randn(x.shape, generator=gen)

    def fwd_bwd(f):
        def run():
            torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), grad)

        return run

    both = interleaved_medians(
        {n: fwd_bwd(f) for n, f in impls.items()}, min_rounds=5, budget_s=3.0
    )
    return {
        "model": label,
        "conv": conv,
        "shape": {"B": batch, "H": side, "W": side, "C": channels, "k": k},
        "fwd_s": fwd,
        "fwd_bwd_s": both,
    }


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# ppma_ops depthwise convolution benchmark",
        "",
        f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, native "
        f"kernel: {meta['native']} (ISA {meta['cpu_isa']}). Medians of interleaved rounds, "
        "ms; ratio = F.conv2d time / native time.",
        "",
        "| model / stage | conv | B×H×W×C | native fwd | F.conv2d fwd | fwd ratio | "
        "native fwd+bwd | F.conv2d fwd+bwd | fwd+bwd ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s, f, fb = r["shape"], r["fwd_s"], r["fwd_bwd_s"]
        lines.append(
            f"| {r['model']} | {r['conv']} | {s['B']}×{s['H']}×{s['W']}×{s['C']} | "
            f"{f['native'] * 1e3:.3f} | {f['conv2d'] * 1e3:.3f} | "
            f"{f['conv2d'] / f['native']:.1f}× | {fb['native'] * 1e3:.3f} | "
            f"{fb['conv2d'] * 1e3:.3f} | {fb['conv2d'] / fb['native']:.1f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--quick", action="store_true", help="three small shapes, a smoke run")
    args = parser.parse_args()
    info = _native._C.build_info() if _native._C is not None else {}
    rows = []
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        print(*shape, flush=True)
        rows.append(bench_shape(*shape))
    result = {
        "rows": rows,
        "meta": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "native": _native.has_native_op("depthwise_conv2d"),
            "cpu_isa": info.get("cpu_isa", "–"),
            "quick": args.quick,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "depthwise.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "depthwise.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
