"""Operator benchmark of ppma_ops (docs/design.md §6): run by `nox -s bench`.

Vanilla polyline attention: the native kernel against (1) the reference written the upstream
way (materialised N×N log-mask, two softmaxes), (2) SDPA with a materialised float mask, called
once per direction, mask construction included, and (3) FlexAttention (forward only) with a
score_mod that reads the cumsum tables, compiled with torch.compile. Criss-cross attention and
the polyline scan: ppma_ops' public op (native when loaded) against the reference.

Implementations are interleaved (one call of each per round) and medians reported, because
the machine is shared. Peak extra memory is the growth of the process's peak RSS during one
call (VmHWM reset through /proc/self/clear_refs): it sees torch allocations and the kernels'
own scratch alike. GFLOP/s count 2·N²·d (QKᵀ) + 2·N²·c (PV) per batch·head for one forward,
the convention of a single attention; the fp32 matmul peak is measured in the same run with
a 4096² torch.mm.

    python packages/ppma-ops/benchmarks/bench_ops.py --out benchmarks [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import ppma_ops
import torch
from baselines import make_flex_polyline_attention, sdpa_polyline_attention
from ppma_ops import _native, reference

# (H, W, heads, d, batch) from the real configs (docs/design.md §6).
ATTENTION_SHAPES = [
    (7, 7, 16, 32, 64),
    (14, 14, 8, 32, 64),
    (32, 32, 8, 32, 2),
    (56, 56, 4, 16, 8),
    (64, 64, 8, 32, 1),
    (64, 64, 8, 32, 2),
    (84, 50, 8, 32, 2),
]
# FlexAttention compiles one kernel per shape and direction (minutes each on 2 shared cores):
# it runs at the two dense-task shapes only.
FLEX_SHAPES = {(32, 32, 8, 32, 2), (64, 64, 8, 32, 1)}
QUICK_SHAPES = [(7, 7, 16, 32, 4), (14, 14, 8, 32, 4), (32, 32, 8, 32, 1)]
SCAN_SIDES = [16, 32, 64, 128, 256]
QUICK_SCAN_SIDES = [16, 32, 64]

# Baselines that materialise N×N are skipped where their estimated footprint exceeds this
# (the machine has 24 GB shared by several jobs).
DENSE_BUDGET_BYTES = 7 * 2**30


# ---------------------------------------------------------------- measurement helpers


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Growth of the peak RSS during one call of fn, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss_kib("VmRSS:")
    fn()
    return max(0, _rss_kib("VmHWM:") - before) / 1024


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    min_rounds: int = 3,
    budget_s: float = 20.0,
    cpu_out: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median wall seconds per call of each fn, calling them in turn, round after round.

    cpu_out, when given, receives the median process CPU seconds per call (all threads): on
    a machine shared with other jobs wall time also measures waiting for a core, CPU time
    does not.
    """
    for fn in fns.values():
        fn()  # warm-up (allocations, compiled code, caches)
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < 15):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        rounds += 1
    if cpu_out is not None:
        cpu_out.update({name: statistics.median(ts) for name, ts in cpu.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


PEAK_N = 2048  # 17 GFLOP per torch.mm: MKL runs at its peak, 0.1 s per call on 2 cores


def matmul_call() -> Callable[[], object]:
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    return lambda: a @ b


def matmul_peak_gflops(rounds: int = 7) -> float:
    """fp32 matmul rate, median of a few calls (standalone, for the report header)."""
    return 2 * PEAK_N**3 / interleaved_medians({"mm": matmul_call()}, rounds, 0.0)["mm"] / 1e9


def _inputs(b, heads, h, w, d, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, heads, h, w, d, generator=gen) for _ in range(3))
    # Decays of trained models: α, β around 0.9…0.999.
    la, lb = (-0.1 * torch.rand(b, heads, h, w, generator=gen) for _ in range(2))
    tensors = [q, k, v, la, lb]
    if requires_grad:
        tensors = [t.requires_grad_(True) for t in tensors]
    return tensors


def _fwd_bwd(fn, tensors, scale):
    def run():
        for t in tensors:
            t.grad = None
        fn(*tensors, scale).sum().backward()

    return run


def bench_vanilla(shape, with_flex: bool) -> dict:
    h, w, heads, d, b = shape
    n = h * w
    scale = d**-0.5
    flops = b * heads * (2 * n * n * d + 2 * n * n * d)
    # Reference fwd keeps ~6 N×N float32 buffers alive (mask, its H×H×W×W source, scores,
    # softmaxes); with autograd ~12.
    dense_fwd = 6 * b * heads * n * n * 4
    dense_bwd = 12 * b * heads * n * n * 4
    x = _inputs(b, heads, h, w, d)
    xg = _inputs(b, heads, h, w, d, requires_grad=True)

    def native(*a):
        return ppma_ops.polyline_attention(*a[:5], scale=a[5])

    def ref(*a):
        return reference.polyline_attention(*a[:5], scale=a[5])

    fwd = {"native": lambda: native(*x, scale)}
    if dense_fwd <= DENSE_BUDGET_BYTES:
        fwd["reference"] = lambda: ref(*x, scale)
        fwd["sdpa_mask"] = lambda: sdpa_polyline_attention(*x, scale)
    if with_flex:
        flex = make_flex_polyline_attention(h, w)
        fwd["flex_compiled"] = lambda: flex(*x, scale)
    fwd_bwd = {"native": _fwd_bwd(native, xg, scale)}
    if dense_bwd <= DENSE_BUDGET_BYTES:
        fwd_bwd["reference"] = _fwd_bwd(ref, xg, scale)
        fwd_bwd["sdpa_mask"] = _fwd_bwd(sdpa_polyline_attention, xg, scale)

    with torch.no_grad():
        # The matmul peak is one more contestant of the forward rounds, so the fraction of
        # peak compares medians taken under the same machine load.
        c_fwd: dict[str, float] = {}
        t_fwd = interleaved_medians(
            {**fwd, "matmul_peak": matmul_call()}, budget_s=10.0, cpu_out=c_fwd
        )
        peak = 2 * PEAK_N**3 / t_fwd.pop("matmul_peak") / 1e9
        peak_cpu = 2 * PEAK_N**3 / c_fwd.pop("matmul_peak") / 1e9  # per CPU-second
        mem_fwd = {name: peak_extra_mib(fn) for name, fn in fwd.items()}
    c_fb: dict[str, float] = {}
    t_fb = interleaved_medians(fwd_bwd, budget_s=10.0, cpu_out=c_fb)
    mem_fb = {name: peak_extra_mib(fn) for name, fn in fwd_bwd.items()}
    return {
        "shape": {"H": h, "W": w, "heads": heads, "d": d, "batch": b, "N": n},
        "flops_fwd": flops,
        "fwd_s": t_fwd,
        "fwd_bwd_s": t_fb,
        "fwd_cpu_s": c_fwd,
        "fwd_bwd_cpu_s": c_fb,
        "fwd_peak_extra_mib": mem_fwd,
        "fwd_bwd_peak_extra_mib": mem_fb,
        "matmul_peak_gflops": peak,
        "fwd_gflops": {k_: flops / t / 1e9 for k_, t in t_fwd.items()},
        "fwd_fraction_of_peak": {k_: flops / t / 1e9 / peak for k_, t in t_fwd.items()},
        # The same in CPU time: FLOPs per CPU-second of the op over those of the matmul.
        "fwd_fraction_of_peak_cpu": {k_: flops / t / 1e9 / peak_cpu for k_, t in c_fwd.items()},
    }


def bench_criss_cross(shape) -> dict:
    h, w, heads, d, b = shape
    scale = d**-0.5
    x = _inputs(b, heads, h, w, d)
    xg = _inputs(b, heads, h, w, d, requires_grad=True)

    def public(*a):
        return ppma_ops.criss_cross_attention(*a[:5], scale=a[5])

    def ref(*a):
        return reference.criss_cross_attention(*a[:5], scale=a[5])

    c_fwd: dict[str, float] = {}
    c_fb: dict[str, float] = {}
    with torch.no_grad():
        t_fwd = interleaved_medians(
            {"ppma_ops": lambda: public(*x, scale), "reference": lambda: ref(*x, scale)},
            budget_s=8.0,
            cpu_out=c_fwd,
        )
    t_fb = interleaved_medians(
        {"ppma_ops": _fwd_bwd(public, xg, scale), "reference": _fwd_bwd(ref, xg, scale)},
        budget_s=8.0,
        cpu_out=c_fb,
    )
    return {
        "shape": {"H": h, "W": w, "heads": heads, "d": d, "batch": b},
        "fwd_s": t_fwd,
        "fwd_bwd_s": t_fb,
        "fwd_cpu_s": c_fwd,
        "fwd_bwd_cpu_s": c_fb,
    }


def bench_scan(sides) -> dict:
    rows = []
    for side in sides:
        n = side * side
        gen = torch.Generator().manual_seed(side)
        x = torch.randn(1, 4, side, side, 32, generator=gen)
        la, lb = (-0.1 * torch.rand(1, 4, side, side, generator=gen) for _ in range(2))
        fns = {"ppma_ops": lambda x=x, la=la, lb=lb: ppma_ops.polyline_scan(x, la, lb)}
        if 4 * n * n * 8 * 4 <= DENSE_BUDGET_BYTES / 2 and n <= 4096:
            fns["reference"] = lambda x=x, la=la, lb=lb: reference.polyline_scan(x, la, lb)
        cpu: dict[str, float] = {}
        with torch.no_grad():
            wall = interleaved_medians(fns, budget_s=4.0, cpu_out=cpu)
        rows.append({"side": side, "N": n, "s": wall, "cpu_s": cpu})

    def slope(key: str) -> float:
        ns = [math.log(r["N"]) for r in rows]
        ts = [math.log(r[key]["ppma_ops"]) for r in rows]
        mean_n, mean_t = statistics.fmean(ns), statistics.fmean(ts)
        return sum((a - mean_n) * (b - mean_t) for a, b in zip(ns, ts, strict=True)) / sum(
            (a - mean_n) ** 2 for a in ns
        )

    return {
        "rows": rows,
        "loglog_slope_ppma_ops": slope("s"),
        "loglog_slope_ppma_ops_cpu": slope("cpu_s"),
        "x_shape": "(1, 4, side, side, 32)",
    }


# ---------------------------------------------------------------- report


def _fmt_ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.1f}×"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# ppma_ops operator benchmark",
        "",
        f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, native "
        f"kernels: {meta['native']} (ISA {meta['cpu_isa']}, tile GEMM {meta['tile_gemm']}). "
        f"fp32 matmul peak ({PEAK_N}² torch.mm, median, at the start of the run): "
        f"**{meta['matmul_peak_gflops']:.0f} GFLOP/s**; each shape's % of peak uses the matmul "
        "median measured interleaved with that shape's forward rounds (column 'peak').",
        "",
        "Times are medians of interleaved rounds (ms). Peak = growth of peak RSS during one call "
        "(MiB). GFLOP/s count 2·N²·d + 2·N²·c per batch·head for one forward. Ratios are "
        "baseline time / native time. FlexAttention: torch.compile'd flex_attention, two calls "
        "(one per mask direction), forward only, at 32×32 b2 and 64×64 b1 (compile time). "
        "`–`: not run (dense baselines above "
        f"{DENSE_BUDGET_BYTES / 2**30:.0f} GiB estimated footprint).",
        "",
        "## Vanilla polyline attention",
        "",
        "| H×W | heads | d | batch | native fwd | ref fwd | SDPA+mask fwd | Flex fwd | "
        "fwd vs ref | fwd vs SDPA | native GFLOP/s (% of peak) | peak GFLOP/s | native fwd+bwd | "
        "ref fwd+bwd | fwd+bwd vs ref | peak MiB native / ref (fwd) | "
        "peak MiB native / ref (fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["vanilla"]:
        s, f, fb = r["shape"], r["fwd_s"], r["fwd_bwd_s"]
        mf, mfb = r["fwd_peak_extra_mib"], r["fwd_bwd_peak_extra_mib"]
        mem_f = f"{mf['native']:.0f} / " + (f"{mf['reference']:.0f}" if "reference" in mf else "–")
        mem_fb = f"{mfb['native']:.0f} / " + (
            f"{mfb['reference']:.0f}" if "reference" in mfb else "–"
        )
        lines.append(
            f"| {s['H']}×{s['W']} | {s['heads']} | {s['d']} | {s['batch']} | "
            f"{_fmt_ms(f['native'])} | {_fmt_ms(f.get('reference'))} | "
            f"{_fmt_ms(f.get('sdpa_mask'))} | {_fmt_ms(f.get('flex_compiled'))} | "
            f"{_ratio(f.get('reference'), f['native'])} | "
            f"{_ratio(f.get('sdpa_mask'), f['native'])} | "
            f"{r['fwd_gflops']['native']:.0f} ({100 * r['fwd_fraction_of_peak']['native']:.0f}%)"
            f" | {r['matmul_peak_gflops']:.0f} | {_fmt_ms(fb['native'])} | "
            f"{_fmt_ms(fb.get('reference'))} | "
            f"{_ratio(fb.get('reference'), fb['native'])} | {mem_f} | {mem_fb} |"
        )
    lines += [
        "",
        "## Criss-cross polyline attention (ppma_ops public op vs reference)",
        "",
        f"ppma_ops runs the native kernel: {result['criss_cross_native']}.",
        "",
        "| H×W | heads | d | batch | fwd | ref fwd | fwd vs ref | fwd+bwd | ref fwd+bwd | "
        "fwd+bwd vs ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["criss_cross"]:
        s, f, fb = r["shape"], r["fwd_s"], r["fwd_bwd_s"]
        lines.append(
            f"| {s['H']}×{s['W']} | {s['heads']} | {s['d']} | {s['batch']} | "
            f"{_fmt_ms(f['ppma_ops'])} | {_fmt_ms(f['reference'])} | "
            f"{_ratio(f['reference'], f['ppma_ops'])} | {_fmt_ms(fb['ppma_ops'])} | "
            f"{_fmt_ms(fb['reference'])} | {_ratio(fb['reference'], fb['ppma_ops'])} |"
        )
    scan = result["scan"]
    lines += [
        "",
        "## Polyline scan y = L·x",
        "",
        f"x {scan['x_shape']}; ppma_ops runs the native kernel: {result['scan_native']}. "
        f"Fitted log-log slope of time vs N: **{scan['loglog_slope_ppma_ops']:.2f}**.",
        "",
        "| H×W | N | ppma_ops (ms) | reference (ms) |",
        "|---|---|---|---|",
    ]
    for r in scan["rows"]:
        lines.append(
            f"| {r['side']}×{r['side']} | {r['N']} | {_fmt_ms(r['s']['ppma_ops'])} | "
            f"{_fmt_ms(r['s'].get('reference'))} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "Met = the wall-clock figure reaches the target; the CPU-time figure (process CPU "
        "seconds, all threads) is given because other jobs share the cores.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(result: dict) -> list[dict]:
    """The operator targets, each measured in wall time and in process CPU time."""

    def find(rows, h, w, b):
        for r in rows:
            s = r["shape"]
            if (s["H"], s["W"], s["batch"]) == (h, w, b):
                return r
        return None

    def ratio(r, key, base):
        if r is None or base not in r[key]:
            return None
        return r[key][base] / r[key]["native" if "native" in r[key] else "ppma_ops"]

    out = []

    def add(target, wall, cpu, threshold, fmt="{:.1f}×", label="wall "):
        measured = "not measured" if wall is None else f"{label}{fmt.format(wall)}"
        if cpu is not None:
            measured += f", CPU time {fmt.format(cpu)}"
        met = wall is not None and wall >= threshold
        out.append({"target": target, "measured": measured, "met": met, "wall": wall, "cpu": cpu})

    big = find(result["vanilla"], 64, 64, 1)
    for key, label, thr in (("fwd", "fwd", 10), ("fwd_bwd", "fwd+bwd", 5)):
        add(
            f"64×64×8×32 b1: native {label} ≥ {thr}× reference",
            ratio(big, f"{key}_s", "reference"),
            ratio(big, f"{key}_cpu_s", "reference"),
            thr,
        )
    mem = None
    if big is not None and "reference" in big["fwd_bwd_peak_extra_mib"]:
        m, mb = big["fwd_peak_extra_mib"], big["fwd_bwd_peak_extra_mib"]
        # Native growth below 1 MiB is at the probe's resolution: count it as 1 MiB.
        mem = min(m["reference"] / max(m["native"], 1.0), mb["reference"] / max(mb["native"], 1.0))
    add(
        "64×64×8×32 b1: native peak extra memory ≤ 1/20 reference (fwd and fwd+bwd)",
        mem,
        None,
        20,
        "reference / native = {:.0f}× (native < 1 MiB counted as 1 MiB)",
        "",
    )
    small = find(result["vanilla"], 14, 14, 64)
    add(
        "14×14×8×32 b64: native fwd ≥ 2× reference",
        ratio(small, "fwd_s", "reference"),
        ratio(small, "fwd_cpu_s", "reference"),
        2,
    )
    big_rows = [
        r for r in result["vanilla"] if r["shape"]["N"] >= 1024 and "sdpa_mask" in r["fwd_s"]
    ]
    add(
        "N ≥ 1024: native fwd ≥ 2× SDPA+mask (worst shape)",
        min((ratio(r, "fwd_s", "sdpa_mask") for r in big_rows), default=None),
        min((ratio(r, "fwd_cpu_s", "sdpa_mask") for r in big_rows), default=None),
        2,
    )
    cc = find(result["criss_cross"], 56, 56, 8)
    add(
        "56×56×4×16 b8: criss-cross fwd+bwd ≥ 3× reference",
        ratio(cc, "fwd_bwd_s", "reference"),
        ratio(cc, "fwd_bwd_cpu_s", "reference"),
        3,
    )
    add(
        "64×64×8×32 b1: native fwd ≥ 35% of fp32 matmul peak",
        None if big is None else 100 * big["fwd_fraction_of_peak"]["native"],
        None if big is None else 100 * big["fwd_fraction_of_peak_cpu"]["native"],
        35,
        "{:.0f}%",
    )
    slope = result["scan"]["loglog_slope_ppma_ops"]
    out.append(
        {
            "target": "polyline_scan time linear in N (slope ≤ 1.15, 16²…256²)",
            "measured": f"wall {slope:.2f}, CPU time "
            f"{result['scan']['loglog_slope_ppma_ops_cpu']:.2f}",
            "met": slope <= 1.15,
            "wall": slope,
            "cpu": None,
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = QUICK_SHAPES if args.quick else ATTENTION_SHAPES
    info = _native._C.build_info() if _native._C is not None else {}
    peak = matmul_peak_gflops()
    result: dict = {"vanilla": [], "criss_cross": []}
    for shape in shapes:
        print("vanilla", shape, flush=True)
        with_flex = not args.no_flex and (args.quick or shape in FLEX_SHAPES)
        result["vanilla"].append(bench_vanilla(shape, with_flex=with_flex))
    for shape in shapes:
        print("criss-cross", shape, flush=True)
        result["criss_cross"].append(bench_criss_cross(shape))
    print("scan", flush=True)
    result["scan"] = bench_scan(QUICK_SCAN_SIDES if args.quick else SCAN_SIDES)
    result["criss_cross_native"] = _native.has_native_op("criss_cross_attention")
    result["scan_native"] = _native.has_native_op("polyline_scan")
    result["meta"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "native": ppma_ops.native_available(),
        "cpu_isa": info.get("cpu_isa", "–"),
        "tile_gemm": info.get("tile_gemm", "–"),
        "matmul_peak_gflops": peak,
        "quick": args.quick,
    }
    result["targets"] = targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ops.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ops.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
