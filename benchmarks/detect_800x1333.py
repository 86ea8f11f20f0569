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
import sys
import time

from native_vs_reference import add_run_options, run_interleaved, write_report
from process_memory import peak_rss_mib, rss_mib

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.child, args.height, args.width, args.steps, args.threads)
        print(json.dumps(result))
        return 0
    child_args = ["--height", str(args.height), "--width", str(args.width)]
    report = run_interleaved(__file__, child_args, args)
    title = f"mask_rcnn_ppma_tiny (80 classes), 1×3×{args.height}×{args.width}, forward + backward"
    write_report(report, args.out, STEM, title, "PPMA ops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
