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
import sys
import time

from native_vs_reference import add_run_options, run_interleaved, write_report
from process_memory import peak_rss_mib, rss_mib


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=512, help="UPerNet channels (upstream 512)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.size, args.channels, args.steps, args.threads)))
        return 0
    child_args = ["--size", str(args.size), "--channels", str(args.channels)]
    report = run_interleaved(__file__, child_args, args)
    title = f"PPMA-T + UPerNet({args.channels}), 1×3×{args.size}×{args.size}, forward + backward"
    write_report(report, args.out, "segment_512", title, "attention ops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
