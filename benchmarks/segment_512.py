"""PPMA-T + UPerNet on one 512×512 image: forward+backward time and peak memory, native vs
reference attention ops.

Each measurement runs in a fresh subprocess so that its peak resident memory (``VmHWM``) is
its own; the two implementations alternate round by round (interleaved), and the report gives
medians and the reference/native ratio. Memory is reported as the process peak and as the peak
above the resident size after building the model (what the forward/backward pass added).
BatchNorm layers run with running statistics: one image has no batch statistics for the
pyramid pooling's 1×1 map.

    python benchmarks/segment_512.py --rounds 2 --out benchmarks
    nox -s segment_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from process_memory import peak_rss_mib, rss_mib

IMPLS = ("native", "reference")


def measure(impl: str, size: int, channels: int, steps: int, threads: int | None) -> dict:
    """One subprocess's work: build, one warm-up step, then ``steps`` timed steps."""
    import ppma_ops
    import torch
    from ppma_models.segmentation import create_segmentation_model

    if threads:
        torch.set_num_threads(threads)
    ppma_ops.set_backend(impl)  # this process runs one implementation only
    torch.manual_seed(0)
    model = create_segmentation_model(
        "ppma_tiny", 150, channels=channels, aux_channels=channels // 2
    ).train()
    # One image: a BatchNorm after the 1×1 pyramid-pooling branch has a single value per
    # channel, so batch statistics do not exist. BatchNorm layers use their running statistics
    # (frozen-BN fine-tuning); every parameter still gets its gradient.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    x = torch.randn(1, 3, size, size)
    target = torch.randint(0, 150, (1, size, size))
    base = rss_mib()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits, aux = model(x, return_aux=True)
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss = loss + 0.4 * torch.nn.functional.cross_entropy(aux, target)
        loss.backward()

    step()  # warm-up (allocator, kernels' first-call costs)
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = peak_rss_mib()
    return {
        "impl": impl,
        "native_used": impl == "native" and ppma_ops.native_available(),
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mib": peak,
        "model_rss_mib": base,
        "threads": torch.get_num_threads(),
    }


def _run_child(impl: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--size",
        str(args.size),
        "--channels",
        str(args.channels),
        "--steps",
        str(args.steps),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-5:]
        killed = done.returncode < 0 or done.returncode == 137
        return {"impl": impl, "failed": True, "returncode": done.returncode, "error": tail,
                "killed": killed}  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if not r.get("failed")]
    if not ok:
        return {"failed": True, "errors": [r.get("error") for r in runs]}
    wall = [w for r in ok for w in r["wall_s"]]
    cpu = [c for r in ok for c in r["cpu_s"]]
    return {
        "median_wall_s": statistics.median(wall),
        "median_cpu_s": statistics.median(cpu),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
        "added_peak_mib": max(r["peak_rss_mib"] - r["model_rss_mib"] for r in ok),
        "native_used": any(r.get("native_used") for r in ok),
        "samples": len(wall),
    }


def _markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"# PPMA-T + UPerNet({cfg['channels']}), 1×3×{cfg['size']}×{cfg['size']}, "
        "forward + backward",
        "",
        f"{report['machine']}; torch {report['torch']}; {cfg['rounds']} interleaved rounds × "
        f"{cfg['steps']} step(s) per implementation, medians.",
        "",
        "| attention ops | median wall (s) | median CPU (s) | peak RSS (MiB) | added by the "
        "step (MiB) |",
        "|---|---|---|---|---|",
    ]
    for impl in IMPLS:
        s = report["results"][impl]
        if s.get("failed"):
            lines.append(f"| {impl} | failed | | | |")
            continue
        label = impl if impl != "native" or s["native_used"] else "native (NOT loaded)"
        lines.append(
            f"| {label} | {s['median_wall_s']:.2f} | {s['median_cpu_s']:.2f} | "
            f"{s['peak_rss_mib']:.0f} | {s['added_peak_mib']:.0f} |"
        )
    ratio = report.get("reference_over_native")
    if ratio:
        lines += ["", f"reference / native wall-time ratio: {ratio['wall']:.2f}×; "
                  f"added memory ratio: {ratio['memory']:.2f}×"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=512, help="UPerNet channels (upstream 512)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default="benchmarks", help="directory for JSON + MD")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.size, args.channels, args.steps, args.threads)))
        return 0

    import torch

    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for r in range(args.rounds):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for impl in order:
            result = _run_child(impl, args)
            runs[impl].append(result)
            state = (
                "failed" if result.get("failed") else f"{statistics.median(result['wall_s']):.2f}s"
            )
            print(f"round {r + 1}/{args.rounds} {impl}: {state}", file=sys.stderr)
    results = {impl: _summary(runs[impl]) for impl in IMPLS}
    report = {
        "config": vars(args) | {"child": None},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "results": results,
        "runs": runs,
    }
    nat, ref = results["native"], results["reference"]
    if not nat.get("failed") and not ref.get("failed"):
        report["reference_over_native"] = {
            "wall": ref["median_wall_s"] / nat["median_wall_s"],
            "memory": ref["added_peak_mib"] / max(nat["added_peak_mib"], 1e-9),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "segment_512.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "segment_512.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
