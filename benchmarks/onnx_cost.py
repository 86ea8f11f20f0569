"""What an exported ONNX graph costs against the native ops: PPMA-T classifier inference.

The model is exported once with :func:`ppma_models.export_onnx` (dynamic batch and size; the
attention as standard ONNX operators, docs/design.md §7.1). Then, for each image size, the same
seeded model runs one 1×3×S×S image in PyTorch with the native ops and the file runs in
onnxruntime's CPU provider, each in its own subprocess (so its peak resident memory is its own),
alternating round by round. Reported: median time per image, the peak memory the runs added
above the process's size after loading (model, or session), the largest |logit difference|,
and the export's own time and file size.

    python benchmarks/onnx_cost.py --out benchmarks        # sizes 224 512 1024, 1 thread
    nox -s bench_onnx
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from process_memory import peak_rss_mib, rss_mib

RUNTIMES = ("native", "onnx")
MODEL = "ppma_tiny"


def _model():
    import ppma_models
    import torch

    torch.manual_seed(0)
    return ppma_models.create_model(MODEL).eval()


def _image(size: int):
    import torch

    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))


def measure(runtime: str, onnx_path: str, size: int, steps: int, threads: int) -> dict:
    """One subprocess's work: load, one warm-up run, then ``steps`` timed runs."""
    import torch

    torch.set_num_threads(threads)
    x = _image(size)
    if runtime == "native":
        import ppma_ops

        ppma_ops.set_backend("native")
        model = _model()

        def run():
            with torch.no_grad():
                return model(x).numpy()
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run():
            return session.run(None, {name: x.numpy()})[0]

    base = rss_mib()
    logits = run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "runtime": runtime,
        "size": size,
        "seconds": times,
        "loaded_rss_mib": base,
        "peak_rss_mib": peak_rss_mib(),
        "logits": logits[0].tolist(),
    }


def _machine() -> str:
    """CPU model, the widest vector ISA it has, and the CPU count."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), "no AVX2")
    return f"{name} ({isa}), {os.cpu_count()} CPUs"


def _run_child(runtime: str, size: int, args: argparse.Namespace, onnx_path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", runtime, "--size", str(size), "--onnx", onnx_path]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-5:]
        return {"runtime": runtime, "size": size, "failed": True, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export(path: Path) -> dict:
    import ppma_models

    start = time.perf_counter()
    ppma_models.export_onnx(_model(), path, verify=False)
    return {"seconds": time.perf_counter() - start, "file_mib": path.stat().st_size / 2**20}


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if not r.get("failed")]
    if not ok:
        return {"failed": True, "errors": [r.get("error") for r in runs]}
    return {
        "median_s": statistics.median(t for r in ok for t in r["seconds"]),
        "added_peak_mib": max(r["peak_rss_mib"] - r["loaded_rss_mib"] for r in ok),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
        "logits": ok[0]["logits"],
    }


def _row(size: int, native: dict, onnx: dict) -> dict:
    if native.get("failed") or onnx.get("failed"):
        return {"size": size, "failed": True}
    diff = max(abs(a - b) for a, b in zip(native["logits"], onnx["logits"], strict=True))
    return {
        "size": size,
        "native_s": native["median_s"],
        "onnx_s": onnx["median_s"],
        "time_ratio": onnx["median_s"] / native["median_s"],
        "native_added_mib": native["added_peak_mib"],
        "onnx_added_mib": onnx["added_peak_mib"],
        "memory_ratio": onnx["added_peak_mib"] / max(native["added_peak_mib"], 1e-9),
        "max_abs_logit_diff": diff,
    }


def _markdown(report: dict) -> str:
    cfg, export = report["config"], report["export"]
    lines = [
        f"# {MODEL} classifier, one image: native ops in PyTorch vs the ONNX file in onnxruntime",
        "",
        f"{report['machine']}; torch {report['torch']}, onnxruntime {report['onnxruntime']}; "
        f"{cfg['threads']} thread(s); {cfg['rounds']} interleaved rounds × {cfg['steps']} "
        "timed runs after one warm-up, medians. Memory: peak added above the loaded process.",
        "",
        f"Export: {export['seconds']:.0f} s, file {export['file_mib']:.0f} MiB.",
        "",
        "| image | native s | ONNX s | ONNX / native time | native added MiB | ONNX added MiB "
        "| ONNX / native memory | max abs logit diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r.get("failed"):
            lines.append(f"| {r['size']}² | failed | | | | | | |")
            continue
        lines.append(
            f"| {r['size']}² | {r['native_s']:.3f} | {r['onnx_s']:.3f} | {r['time_ratio']:.2f}× "
            f"| {r['native_added_mib']:.0f} | {r['onnx_added_mib']:.0f} "
            f"| {r['memory_ratio']:.1f}× | {r['max_abs_logit_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024])
    parser.add_argument("--steps", type=int, default=2, help="timed runs per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="threads of both runtimes")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default="benchmarks", help="directory for JSON + MD")
    parser.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.onnx, args.size, args.steps, args.threads)))
        return 0

    import onnxruntime
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{MODEL}.onnx"
        print(f"exporting {MODEL} ...", file=sys.stderr)
        export = _export(path)
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds):
            for size in args.sizes:
                for runtime in RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]:
                    result = _run_child(runtime, size, args, str(path))
                    runs.setdefault((runtime, size), []).append(result)
                    state = "failed" if result.get("failed") else f"{min(result['seconds']):.3f}s"
                    print(
                        f"round {r + 1}/{args.rounds} {size}² {runtime}: {state}", file=sys.stderr
                    )
    rows = [
        _row(size, _summary(runs[("native", size)]), _summary(runs[("onnx", size)]))
        for size in args.sizes
    ]
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "size", "onnx")},
        "machine": _machine(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "export": export,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "onnx.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
