"""GPU benchmark of the ppma_ops CUDA kernels (run on a machine with a CUDA device).

    python packages/ppma-ops/benchmarks/bench_cuda.py [--out benchmarks/cuda] [--quick]

Needs ppma_ops built with its CUDA kernels (see the package README, "CUDA kernels") and, for
the whole-model rows, ppma_models. Measures, interleaved in one run (round-robin over the
implementations, CUDA-event timings, medians), forward and forward+backward of:

* vanilla polyline attention at (H, W, heads, d) = (64, 64, 8, 32) batch 8 and
  (14, 14, 8, 32) batch 64: native CUDA op; FlexAttention (torch.compile'd flex_attention,
  forward and backward, two calls whose score_mods read the cumsum tables, averaged); SDPA with
  a materialised float mask, once per direction (mask construction included); the reference op;
* criss-cross attention at (56, 56, 4, 16) batch 8 and (14, 14, 8, 32) batch 64: native vs
  reference;
* the polyline scan y = L·x at 64×64 and 128×128 (heads 8, c 32, batch 8): native vs reference
  (the reference materialises the N×N mask, so it is skipped where that does not fit);
* whole-model PPMA-T training throughput (images/s, 224², batch 64, SGD step) with the native
  vs the reference attention ops (ppma_models.create_model("ppma_tiny", attention=...)).

Peak memory (torch.cuda.max_memory_allocated above the inputs) is measured once per
implementation, outside the timing loop. Writes cuda.json and cuda.md into --out.
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

import torch
from baselines import make_flex_polyline_attention, sdpa_polyline_attention

Thunk = Callable[[], object]


# ----------------------------------------------------------------------------- measurement
def cuda_time_s(fn: Thunk) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved_medians(fns: dict[str, Thunk], *, warmup: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each thunk, timed round-robin so drifts hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(cuda_time_s(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_extra_mib(fn: Thunk) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def guarded(fn: Thunk) -> Thunk | str:
    """fn if one call succeeds, else the reason (out of memory, unsupported) as a string."""
    try:
        fn()
        torch.cuda.synchronize()
        return fn
    except (torch.cuda.OutOfMemoryError, RuntimeError, NotImplementedError) as exc:
        torch.cuda.empty_cache()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def run_group(fns: dict[str, Thunk], *, warmup: int, rounds: int) -> dict[str, dict]:
    usable: dict[str, Thunk] = {}
    rows: dict[str, dict] = {}
    for name, fn in fns.items():
        checked = guarded(fn)
        if isinstance(checked, str):
            rows[name] = {"error": checked}
        else:
            usable[name] = checked
    times = interleaved_medians(usable, warmup=warmup, rounds=rounds)
    for name, fn in usable.items():
        rows[name] = {"median_s": times[name], "peak_extra_mib": peak_extra_mib(fn)}
    return rows


# ----------------------------------------------------------------------------- inputs
def make_inputs(b, heads, h, w, d, *, requires_grad: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    q, k, v = randn(b, heads, h, w, d), randn(b, heads, h, w, d), randn(b, heads, h, w, d)
    la = -torch.rand(b, heads, h, w, generator=gen, device="cuda") * 2.0 - 0.01
    lb = -torch.rand(b, heads, h, w, generator=gen, device="cuda") * 2.0 - 0.01
    tensors = [q, k, v, la, lb]
    return [t.requires_grad_(requires_grad) for t in tensors]


def fwd_bwd(fn: Callable, tensors: list[torch.Tensor]) -> Thunk:
    def run():
        for t in tensors:
            t.grad = None
        out = fn(*tensors)
        out.backward(torch.ones_like(out))

    return run


# ----------------------------------------------------------------------------- op benchmarks
def time_impls(
    impls: dict[str, Callable], inputs: list, grad_inputs: list, *, warmup: int, rounds: int
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Rows per implementation: forward without grad on ``inputs``, then forward+backward on
    ``grad_inputs`` (tensors that require grad)."""
    with torch.no_grad():
        fwd = run_group(
            {name: (lambda f=f: f(*inputs)) for name, f in impls.items()},
            warmup=warmup,
            rounds=rounds,
        )
    both = run_group(
        {name: fwd_bwd(f, grad_inputs) for name, f in impls.items()}, warmup=warmup, rounds=rounds
    )
    return fwd, both


def attention_flops(b, heads, h, w, d) -> float:
    """Forward FLOPs of one masked attention direction as FlashAttention counts them (QKᵀ, PV)."""
    n = h * w
    return 4.0 * b * heads * n * n * d


def bench_vanilla(shape, *, warmup, rounds, with_flex: bool) -> dict:
    import ppma_ops
    from ppma_ops import reference

    b, heads, h, w, d = shape
    scale = d**-0.5

    def native(*a):
        return ppma_ops.polyline_attention(*a, scale=scale)

    def ref(*a):
        return reference.polyline_attention(*a, scale=scale)

    def sdpa(*a):
        return sdpa_polyline_attention(*a, scale)

    impls: dict[str, Callable] = {"native": native, "sdpa_mask": sdpa, "reference": ref}
    if with_flex:
        flex = make_flex_polyline_attention(h, w)
        impls["flex_compiled"] = lambda *a: flex(*a, scale)
    xg = make_inputs(b, heads, h, w, d, requires_grad=True)
    fwd, both = time_impls(
        impls, make_inputs(b, heads, h, w, d, requires_grad=False), xg, warmup=warmup, rounds=rounds
    )
    if with_flex and "error" in both["flex_compiled"]:
        # Older FlexAttention cannot differentiate through tensors captured by a score_mod:
        # time it with gradients for q, k, v only (recorded under its own name).
        def flex_qkv(q, k, v, la, lb):
            return impls["flex_compiled"](q, k, v, la.detach(), lb.detach())

        both.update(
            run_group(
                {"flex_compiled_qkv_grads": fwd_bwd(flex_qkv, xg)}, warmup=warmup, rounds=rounds
            )
        )
    flops = attention_flops(b, heads, h, w, d)
    for row in fwd.values():
        if "median_s" in row:
            row["tflops_one_direction"] = flops / row["median_s"] / 1e12
    return {"shape": list(shape), "forward": fwd, "forward_backward": both}


def bench_criss_cross(shape, *, warmup, rounds) -> dict:
    import ppma_ops
    from ppma_ops import reference

    b, heads, h, w, d = shape
    impls = {"native": ppma_ops.criss_cross_attention, "reference": reference.criss_cross_attention}
    xg = make_inputs(b, heads, h, w, d, requires_grad=True)
    fwd, both = time_impls(
        impls, make_inputs(b, heads, h, w, d, requires_grad=False), xg, warmup=warmup, rounds=rounds
    )
    return {"shape": list(shape), "forward": fwd, "forward_backward": both}


def bench_scan(shape, *, warmup, rounds) -> dict:
    import ppma_ops
    from ppma_ops import reference

    b, heads, h, w, c = shape
    q, _, _, la, lb = make_inputs(b, heads, h, w, 1, requires_grad=True)
    x = torch.randn(b, heads, h, w, c, device="cuda", requires_grad=True)
    tensors = [x, la, lb]
    impls: dict[str, Callable] = {"native": ppma_ops.polyline_scan}
    if (h * w) ** 2 * b * heads * 4 <= 8 * 2**30:  # the reference's N×N mask must fit
        impls["reference"] = reference.polyline_scan
    detached = [t.detach() for t in tensors]
    fwd, both = time_impls(impls, detached, tensors, warmup=warmup, rounds=rounds)
    return {"shape": list(shape), "forward": fwd, "forward_backward": both}


# ----------------------------------------------------------------------------- whole model
def bench_model_training(*, batch: int, warmup: int, rounds: int) -> dict:
    from ppma_models import create_model

    torch.manual_seed(0)
    models = {
        impl: create_model("ppma_tiny", attention=impl).cuda().train()
        for impl in ("native", "reference")
    }
    models["reference"].load_state_dict(models["native"].state_dict())
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    steps: dict[str, Thunk] = {}
    for impl, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()

        steps[impl] = step
    rows = run_group(steps, warmup=warmup, rounds=rounds)
    for row in rows.values():
        if "median_s" in row:
            row["images_per_s"] = batch / row["median_s"]
    return {"model": "ppma_tiny", "batch": batch, "resolution": 224, "train_step": rows}


# ----------------------------------------------------------------------------- report
def _ms(row: dict | None) -> str:
    if not row:
        return "–"
    if "error" in row:
        return "n/a"
    return f"{row['median_s'] * 1e3:.2f}"


def _ratio(row: dict | None, native: dict | None) -> str:
    if not row or not native or "median_s" not in row or "median_s" not in native:
        return "–"
    return f"{row['median_s'] / native['median_s']:.2f}×"


def markdown(result: dict) -> str:
    lines = [
        f"# ppma_ops CUDA benchmark — {result['device']}",
        "",
        f"torch {result['torch']}, CUDA {result['cuda']}; medians of {result['rounds']} "
        "interleaved rounds (CUDA events). Ratios: baseline time / native time (> 1: native "
        "faster). Peak: extra CUDA memory of one call.",
        "",
    ]
    for title, key, names in (
        (
            "Vanilla polyline attention",
            "vanilla",
            ("native", "flex_compiled", "flex_compiled_qkv_grads", "sdpa_mask", "reference"),
        ),
        ("Criss-cross attention", "criss_cross", ("native", "reference")),
        ("Polyline scan y = L·x", "scan", ("native", "reference")),
    ):
        lines += [f"## {title}", ""]
        head = "| shape (B, heads, H, W, d) | pass | " + " | ".join(f"{n} ms" for n in names)
        head += " | " + " | ".join(f"{n}/native" for n in names[1:]) + " | native peak MiB |"
        lines += [head, "|" + "---|" * (3 + 2 * len(names) - 1)]
        for entry in result[key]:
            for pass_name in ("forward", "forward_backward"):
                rows = entry[pass_name]
                native = rows.get("native")
                cells = [_ms(rows.get(n)) for n in names]
                ratios = [_ratio(rows.get(n), native) for n in names[1:]]
                peak = (
                    f"{native['peak_extra_mib']:.0f}"
                    if native and "peak_extra_mib" in native
                    else "–"
                )
                lines.append(
                    f"| {tuple(entry['shape'])} | {pass_name} | "
                    + " | ".join(cells + ratios)
                    + f" | {peak} |"
                )
        lines.append("")
    if result.get("model"):
        m = result["model"]
        rows = m["train_step"]
        lines += [
            "## Whole model: PPMA-T training step",
            "",
            f"batch {m['batch']}, {m['resolution']}², SGD, fp32.",
            "",
            "| attention ops | step ms | images/s |",
            "|---|---|---|",
        ]
        for impl in ("native", "reference"):
            row = rows.get(impl, {})
            ips = f"{row['images_per_s']:.0f}" if "images_per_s" in row else row.get("error", "–")
            lines.append(f"| {impl} | {_ms(row)} | {ips} |")
        lines.append("")
    errors = [
        f"- {key} {tuple(e['shape'])} {p} {name}: {row['error']}"
        for key in ("vanilla", "criss_cross", "scan")
        for e in result[key]
        for p in ("forward", "forward_backward")
        for name, row in e[p].items()
        if "error" in row
    ]
    if errors:
        lines += ["Not measured:", "", *errors, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/cuda"))
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke run)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles)")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    import ppma_ops

    if not torch._C._dispatch_has_kernel_for_dispatch_key("ppma::_polyline_attention_fwd", "CUDA"):
        raise SystemExit(
            "ppma_ops has no CUDA kernels in this build "
            f"(build_info: {ppma_ops._native._C.build_info() if ppma_ops._native._C else None})"
        )
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 baselines in fp32, like the kernels
    warmup, rounds = (1, 3) if args.quick else (3, 15)
    if args.quick:
        vanilla = [(2, 2, 14, 14, 32)]
        criss = [(2, 2, 14, 14, 32)]
        scans = [(2, 2, 32, 32, 32)]
    else:
        vanilla = [(8, 8, 64, 64, 32), (64, 8, 14, 14, 32)]
        criss = [(8, 4, 56, 56, 16), (64, 8, 14, 14, 32)]
        scans = [(8, 8, 64, 64, 32), (8, 8, 128, 128, 32)]
    started = time.time()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "rounds": rounds,
        "vanilla": [
            bench_vanilla(s, warmup=warmup, rounds=rounds, with_flex=not args.no_flex)
            for s in vanilla
        ],
        "criss_cross": [bench_criss_cross(s, warmup=warmup, rounds=rounds) for s in criss],
        "scan": [bench_scan(s, warmup=warmup, rounds=rounds) for s in scans],
        "model": None,
    }
    if not args.no_model:
        try:
            result["model"] = bench_model_training(
                batch=8 if args.quick else 64, warmup=warmup, rounds=max(3, rounds // 3)
            )
        except ImportError as exc:
            result["model"] = {"error": f"ppma_models not importable: {exc}"}
    result["wall_s"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda.json").write_text(json.dumps(result, indent=2, default=_json_default))
    if result["model"] and "error" in result["model"]:
        result["model"] = None
    (args.out / "cuda.md").write_text(markdown(result))
    print(markdown(result))


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


if __name__ == "__main__":
    main()
