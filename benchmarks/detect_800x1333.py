"""mask_rcnn_ppma_tiny on one 800×1333 image (the paper's COCO size): forward + backward time
and peak memory, native vs reference PPMA ops.

The detector is built as for COCO (80 classes, mmdetection's 1x settings) and trained one step
on a fixed image with five instances. Each measurement runs in a fresh subprocess, so that its
peak resident memory (``VmHWM``) is its own; the two implementations alternate round by round
(interleaved) and the report gives medians and the reference/native ratio. Memory is reported
as the process peak and as the peak above the resident size after building the model.

    python benchmarks/detect_800x1333.py --rounds 2 --out benchmarks
    nox -s detect_bench
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
STEM = "detect_800x1333"


def _inputs(height: int, width: int):
    """One image and five instances (boxes, masks, labels) at fixed places."""
    import torch

    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=g)
    boxes, masks = [], torch.zeros(5, height, width, dtype=torch.uint8)
    for k in range(5):
        x1, y1 = 60 + 230 * k, 80 + 110 * k
        x2, y2 = x1 + 120 + 40 * k, y1 + 90 + 60 * k
        boxes.append([x1, y1, x2, y2])
        masks[k, y1:y2, x1:x2] = 1
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor([1, 5, 17, 40, 80]),
        "masks": masks,
    }
    return image, target


def measure(impl: str, height: int, width: int, steps: int, threads: int | None) -> dict:
    """One subprocess's work: build, one warm-up step, then ``steps`` timed steps."""
    import ppma_ops
    import torch
    from ppma_models.detection import create_detection_model

    if threads:
        torch.set_num_threads(threads)
    ppma_ops.set_backend(impl)
    torch.manual_seed(0)
    model = create_detection_model("mask_rcnn_ppma_tiny", 80).train()
    image, target = _inputs(height, width)
    base = rss_mib()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        losses = model([image], [target])
        sum(losses.values()).backward()

    step()  # warm-up (allocator, kernels' first-call costs)
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "impl": impl,
        "native_used": impl == "native" and ppma_ops.native_available(),
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mib": peak_rss_mib(),
        "model_rss_mib": base,
        "threads": torch.get_num_threads(),
    }


def _run_child(impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--height", str(args.height),
           "--width", str(args.width), "--steps", str(args.steps)]  # fmt: skip
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
        f"# mask_rcnn_ppma_tiny (80 classes), 1×3×{cfg['height']}×{cfg['width']}, "
        "forward + backward",
        "",
        f"{report['machine']}; torch {report['torch']}; {cfg['rounds']} interleaved rounds × "
        f"{cfg['steps']} step(s) per implementation, medians.",
        "",
        "| PPMA ops | median wall (s) | median CPU (s) | peak RSS (MiB) | added by the step "
        "(MiB) |",
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
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default="benchmarks", help="directory for JSON + MD")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.child, args.height, args.width, args.steps, args.threads)
        print(json.dumps(result))
        return 0

    import torch

    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for r in range(args.rounds):
        for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
            result = _run_child(impl, args)
            runs[impl].append(result)
            wall = (
                "failed" if result.get("failed") else f"{statistics.median(result['wall_s']):.2f}s"
            )
            print(f"round {r + 1}/{args.rounds} {impl}: {wall}", file=sys.stderr)
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
    (out / f"{STEM}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{STEM}.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
