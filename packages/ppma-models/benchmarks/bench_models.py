"""Whole-model benchmark: PPMA-T/S/B with the native vs the reference attention ops.

    python packages/ppma-models/benchmarks/bench_models.py [--out benchmarks] [--quick]
        [--authors-ppma PPMA/classification/models/PPMA.py]
        [--authors-rmt PPMA/classification/models/RMT.py]
    (or: nox -s bench_models)

Measures, on this machine:
* images/s for inference (eval, no_grad) and for a training step (forward, cross-entropy,
  backward, SGD step) at batch 16, 224², native and reference ops interleaved in one run on
  the same model object (``ppma_ops.use_backend``), medians over repeats;
* peak resident memory of one such step, each configuration in its own subprocess (so
  peaks do not mix);
* one dense-size forward: a 1024×1024 image through the PPMA-T backbone (features_only),
  time and peak memory, native vs reference, each in a subprocess with an address-space limit
  so a configuration that does not fit fails alone instead of taking the machine down; if
  the reference does not fit, smaller sizes are tried and reported;
* with ``--authors-ppma`` / ``--authors-rmt`` (files of the authors' public repository,
  github.com/zhongchenzhao/PPMA, imported at run time: see ``peers.py``), the authors'
  ``PPMAViT_T/S/B`` carrying the same weights as ours (their logits are compared first) and
  their ``RMT_T/S/B``, timed in the same interleaved rounds as ours. Without the files these
  rows are simply absent.

Writes ``models.json`` and ``models.md`` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peers import (
    PEERS,
    build_peer,
    file_record,
    load_authors_file,
    logits_agreement,
    transfer_weights,
)

IMPLS = ("native", "reference")


# ----------------------------------------------------------------------------- measurement
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    # VmHWM belongs to this process image; getrusage's ru_maxrss survives fork + exec and
    # would report the parent's peak when that is larger.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(spec: dict):
    from ppma_models import create_model

    if spec["impl"] in PEERS:
        module = load_authors_file(spec["peer_path"], spec["impl"])
        return build_peer(module, spec["impl"], spec["model"])
    torch.manual_seed(0)
    return create_model(spec["model"], features_only=spec["mode"] == "dense")


def _step_fn(model, spec: dict):
    """A closure running one inference / training step / dense forward."""
    b, size = spec["batch"], spec["size"]
    x = torch.randn(b, 3, size, size)
    if spec["mode"] == "train":
        model.train()
        target = torch.randint(0, 1000, (b,))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()

        return step
    model.eval()

    def step():
        with torch.no_grad():
            model(x)

    return step


def child(spec: dict) -> dict:
    """Run in a fresh process: build, one warm-up step, ``timed`` timed steps, peak memory."""
    import warnings

    import ppma_ops

    warnings.simplefilter("ignore")
    if spec["impl"] in ppma_ops.BACKENDS:
        ppma_ops.set_backend(spec["impl"])  # this process runs one implementation only
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    if spec.get("mem_limit_gb"):
        limit = int(spec["mem_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    model = _build(spec)
    step = _step_fn(model, spec)
    base = _rss_mb()
    step()
    times = []
    for _ in range(spec.get("timed", 0)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _peak_rss_mb()
    return {
        "peak_rss_mb": peak,
        "baseline_rss_mb": base,
        "peak_over_baseline_mb": peak - base,
        "times_s": times,
    }


def run_child(spec: dict, mem_limit_gb: float, timeout_s: float) -> dict:
    """``child(spec)`` in a subprocess under an address-space limit; failures are recorded."""
    spec = {**spec, "mem_limit_gb": mem_limit_gb, "threads": torch.get_num_threads()}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[7:])}
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if (
        "MemoryError" in proc.stderr
        or "DefaultCPUAllocator" in proc.stderr
        or proc.returncode in (-9, 137)
    ):
        return {"status": f"out of memory (limit {mem_limit_gb:.0f} GB): {err[:200]}"}
    return {"status": f"failed (rc {proc.returncode}): {err[:300]}"}


def build_contenders(model_name: str, peer_paths: dict[str, str], size: int):
    """Our model and the authors' models given in peer_paths (label → file).

    Returns ({label: (model, ppma_ops backend or None)}, agreement): ours runs under both
    backends on one object; when the authors' PPMA is given, ours carries its weights and
    ``agreement`` compares the two models' logits (else None).
    """
    from ppma_models import create_model

    torch.manual_seed(0)
    ours = create_model(model_name)
    contenders = {impl: (ours, impl) for impl in IMPLS}
    agreement = None
    for label, path in peer_paths.items():
        peer = build_peer(load_authors_file(path, label), label, model_name)
        if label == "authors_ppma":
            transfer_weights(peer, ours)
            agreement = logits_agreement(peer, ours, size)
            if agreement["max_abs_diff"] > 1e-4 * max(agreement["max_abs_logit"], 1.0):
                raise SystemExit(
                    f"{path}: {model_name} and the authors' model disagree with the same "
                    f"weights (max |logit difference| {agreement['max_abs_diff']:.3g}); is "
                    "this their classification PPMA.py?"
                )
        contenders[label] = (peer, None)
    return contenders, agreement


def time_interleaved(contenders: dict, mode: str, batch: int, size: int, repeats: int) -> dict:
    """Step times per contender (see build_contenders), alternating them round by round."""
    import contextlib

    import ppma_ops

    spec = {"mode": mode, "batch": batch, "size": size}
    steps = {label: _step_fn(model, spec) for label, (model, _) in contenders.items()}

    def backend(label: str):
        impl = contenders[label][1]
        return ppma_ops.use_backend(impl) if impl else contextlib.nullcontext()

    labels = list(contenders)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for label in labels:  # warm-up each
        with backend(label):
            steps[label]()
    for r in range(repeats):
        for label in labels if r % 2 == 0 else labels[::-1]:
            with backend(label):
                t0 = time.perf_counter()
                steps[label]()
                times[label].append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------- report
def machine_info() -> dict:
    import ppma_ops

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ops = ("polyline_attention", "criss_cross_attention", "polyline_scan")
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_available": ppma_ops.native_available(),
        "native_ops": {
            op: bool(ppma_ops.native_available() and hasattr(torch.ops.ppma, op)) for op in ops
        },
        "load_average_at_start": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
    }


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# PPMA model benchmark (ppma_models)",
        "",
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}; native ops registered: "
        + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in m["native_ops"].items())
        + f". Load average at start: {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}"
        + f"; OMP_WAIT_POLICY={m['omp_wait_policy']}.",
        "",
        "## Throughput ({size}², medians of {repeats} interleaved repeats after a warm-up)".format(
            **report["settings"]
        ),
        "",
        "| model | step | batch | native img/s | reference img/s | native / reference | "
        "native peak MB | reference peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["throughput"]:
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['batch']} | "
            f"{row['native']['images_per_s']:.2f} | "
            f"{row['reference']['images_per_s']:.2f} | **{row['speedup']:.2f}×** | "
            f"{_mb(row['native'].get('memory'))} | {_mb(row['reference'].get('memory'))} |"
        )
    lines += [
        "",
        "Peak MB = peak resident memory of a fresh process running one step (model, data and "
        "activations; the part above the process's size after building the model in brackets).",
        *peer_markdown(report),
        "",
        "## Dense-size forward: PPMA-T backbone (features_only), batch 1",
        "",
        "| size | attention | time s | peak MB | status |",
        "|---|---|---|---|---|",
    ]
    for row in report["dense"]:
        t = f"{row['time_s']:.2f}" if row.get("time_s") is not None else "—"
        lines.append(f"| {row['size']}² | {row['impl']} | {t} | {_mb(row)} | {row['status']} |")
    lines += ["", "## Targets", ""]
    for name, target in report["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not comparable"}[target["met"]]
        lines.append(f"- {name}: {target['value']} (target {target['target']}) → {verdict}")
    return "\n".join(lines) + "\n"


def peer_markdown(report: dict) -> list[str]:
    """The section on the authors' models (empty when the run had none)."""
    peers = list(report.get("peers") or {})
    rows = [r for r in report["throughput"] if all(p in r for p in peers)]
    if not peers or not rows:
        return []
    names = [PEERS[p][1] for p in peers]
    lines = [
        "",
        "## The authors' models, timed in the same interleaved rounds",
        "",
        "| model | step | batch | ours, native img/s | ours, reference img/s | "
        + " | ".join(f"{n} img/s" for n in names)
        + " | "
        + " | ".join(f"ours / {n}" for n in names)
        + " | "
        + " | ".join(f"{n} peak MB" for n in names)
        + " |",
        "|---" * (5 + 3 * len(peers)) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['batch']} | "
            f"{row['native']['images_per_s']:.2f} | {row['reference']['images_per_s']:.2f} | "
            + " | ".join(f"{row[p]['images_per_s']:.2f}" for p in peers)
            + " | "
            + " | ".join(f"**{row['peer_speedups'][p]:.2f}×**" for p in peers)
            + " | "
            + " | ".join(_mb(row[p].get("memory")) for p in peers)
            + " |"
        )
    lines += ["", "Same weights in ours and the authors' PPMA (eval-mode logits, one batch):", ""]
    for name, a in report.get("peer_agreement", {}).items():
        lines.append(
            f"- {name}: max |difference| {a['max_abs_diff']:.2g} for logits up to "
            f"{a['max_abs_logit']:.2g} (batch {a['batch']}, {a['size']}²)"
        )
    lines += ["", "Files imported:", ""]
    lines += [f"- {PEERS[p][1]}: `{Path(r['path']).name}`, SHA-256 `{r['sha256'][:16]}…`"
              for p, r in report["peers"].items()]  # fmt: skip
    return lines


def _mb(mem: dict | None) -> str:
    if not mem or mem.get("status") != "ok":
        return (mem or {}).get("status", "—")
    return f"{mem['peak_rss_mb']:.0f} ({mem['peak_over_baseline_mb']:.0f})"


# ----------------------------------------------------------------------------------- main
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks", help="output folder")
    parser.add_argument("--models", nargs="+", default=["ppma_tiny", "ppma_small", "ppma_base"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument(
        "--train-models", nargs="+", default=["ppma_tiny", "ppma_small", "ppma_base"]
    )
    parser.add_argument("--dense-size", type=int, default=1024)
    parser.add_argument("--dense-rounds", type=int, default=2)
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=16.0,
        help="address-space limit for each memory-measuring subprocess",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script")
    for label in PEERS:
        parser.add_argument(
            f"--{label.replace('_', '-')}",
            metavar="PATH",
            help=f"{label.split('_')[1].upper()}.py of the authors' repository "
            "(github.com/zhongchenzhao/PPMA, classification/models/): adds its models as peers",
        )
    args = parser.parse_args(argv)
    args.peer_paths = {label: getattr(args, label) for label in PEERS if getattr(args, label)}
    if args.quick:
        args.models, args.batch, args.size, args.repeats = ["ppma_tiny"], 2, 64, 1
        args.train_batch = 2
        args.dense_size, args.dense_rounds = 128, 1
    return args


def measure_throughput(report: dict, args: argparse.Namespace, name: str, mode: str) -> None:
    """One throughput row (both implementations, with their peak memory) into the report."""
    batch = args.batch if mode == "inference" else args.train_batch
    contenders, agreement = build_contenders(name, args.peer_paths, args.size)
    if agreement is not None:
        report["peer_agreement"][name] = agreement
    times = time_interleaved(contenders, mode, batch, args.size, args.repeats)
    row = {"model": name, "mode": mode, "batch": batch}
    for label in contenders:
        med = statistics.median(times[label])
        spec = {"model": name, "impl": label, "mode": mode, "batch": batch, "size": args.size,
                "peer_path": args.peer_paths.get(label)}  # fmt: skip
        row[label] = {
            "times_s": times[label],
            "median_s": med,
            "images_per_s": batch / med,
            "memory": run_child(spec, args.mem_limit_gb, timeout_s=3600),
        }
    native = row["native"]["images_per_s"]
    row["speedup"] = native / row["reference"]["images_per_s"]
    row["peer_speedups"] = {p: native / row[p]["images_per_s"] for p in args.peer_paths}
    report["throughput"].append(row)
    print(
        f"{name} {mode}: "
        + ", ".join(f"{label} {row[label]['images_per_s']:.2f} img/s" for label in contenders)
        + f" (native / reference {row['speedup']:.2f}×)",
        flush=True,
    )


def measure_dense(report: dict, args: argparse.Namespace, sizes: list[int]) -> None:
    """Dense-size rows: subprocesses, interleaved rounds; smaller sizes if the reference does
    not fit."""
    for size in sizes:
        results: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        for _ in range(args.dense_rounds):
            for impl in IMPLS:
                spec = {"model": "ppma_tiny", "impl": impl, "mode": "dense", "batch": 1,
                        "size": size, "timed": 1}  # fmt: skip
                results[impl].append(run_child(spec, args.mem_limit_gb, timeout_s=3600))
        for impl in IMPLS:
            ok = [r for r in results[impl] if r["status"] == "ok"]
            row = {
                "size": size,
                "impl": impl,
                "status": "ok" if ok else results[impl][-1]["status"],
            }
            if ok:
                row["time_s"] = statistics.median(t for r in ok for t in r["times_s"])
                row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
                row["peak_over_baseline_mb"] = max(r["peak_over_baseline_mb"] for r in ok)
            report["dense"].append(row)
            print(f"dense {size}² {impl}: {row}", flush=True)
        if all(r["status"] == "ok" for r in report["dense"][-2:]):
            break


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info(),
        "settings": {
            "batch": args.batch,
            "size": args.size,
            "repeats": args.repeats,
            "train_batch": args.train_batch,
            "dense_size": args.dense_size,
            "mem_limit_gb": args.mem_limit_gb,
        },
        "throughput": [],
        "dense": [],
        "peers": {label: file_record(path) for label, path in args.peer_paths.items()},
        "peer_agreement": {},
    }
    print(json.dumps(report["machine"]), flush=True)

    sizes = [args.dense_size] + [s for s in (768, 512) if s < args.dense_size]
    # The two targets first (PPMA-T inference, dense forward), then the rest; the
    # report is rewritten after each item so an interrupted run still leaves its results.
    first, rest = args.models[0], args.models[1:]
    tasks = [(first, "inference"), ("dense", None)]
    if first in args.train_models:
        tasks.append((first, "train"))
    tasks += [(n, "inference") for n in rest]
    tasks += [(n, "train") for n in rest if n in args.train_models]
    for name, mode in tasks:
        if mode is None:
            measure_dense(report, args, sizes)
        else:
            measure_throughput(report, args, name, mode)
        write_report(report, out, sizes)
    print(to_markdown(report))


def write_report(report: dict, out: Path, sizes: list[int]) -> None:
    tiny = next(
        (r for r in report["throughput"] if r["model"] == "ppma_tiny" and r["mode"] == "inference"),
        None,
    )
    dense = {r["impl"]: r for r in report["dense"] if r["size"] == sizes[0]}
    targets = {}
    if tiny:
        speedup = tiny["speedup"]
        targets["PPMA-T inference speed-up (native / reference)"] = {
            "value": f"{speedup:.2f}×",
            "target": "≥ 1.5×",
            "met": speedup >= 1.5,
        }
    if "native" in dense and dense["native"]["status"] == "ok":
        ref = dense.get("reference", {})
        if ref.get("status") == "ok":
            ratio = dense["native"]["peak_over_baseline_mb"] / ref["peak_over_baseline_mb"]
            targets[f"{sizes[0]}² backbone peak memory (native / reference, above baseline)"] = {
                "value": f"{ratio:.3f}",
                "target": "≤ 1/3",
                "met": ratio <= 1 / 3,
            }
        else:
            native_mb = dense["native"]["peak_rss_mb"]
            targets[f"{sizes[0]}² backbone peak memory (native / reference)"] = {
                "value": f"native {native_mb:.0f} MB; reference: {ref.get('status')}",
                "target": "≤ 1/3",
                "met": None,  # the reference could not run at this size
            }
    targets.update(peer_targets(report))
    report["targets"] = targets
    (out / "models.json").write_text(json.dumps(report, indent=1))
    (out / "models.md").write_text(to_markdown(report))


#: The project's speed targets against the peers: (model, step, peer) → minimum ratio.
PEER_TARGETS = {
    ("ppma_tiny", "inference", "authors_ppma"): 3.0,
    ("ppma_tiny", "inference", "authors_rmt"): 1.6,
    ("ppma_tiny", "train", "authors_ppma"): 2.0,
    ("ppma_tiny", "train", "authors_rmt"): 1.4,
}


def peer_targets(report: dict) -> dict:
    """The peer targets whose rows this run measured."""
    targets = {}
    for row in report["throughput"]:
        for peer, ratio in row.get("peer_speedups", {}).items():
            minimum = PEER_TARGETS.get((row["model"], row["mode"], peer))
            if minimum is not None and row["batch"] == 16 and report["settings"]["size"] == 224:
                step = "inference" if row["mode"] == "inference" else "training step"
                name = f"{row['model']} {step} vs {PEERS[peer][1]} (native, images/s ratio)"
                targets[name] = {
                    "value": f"{ratio:.2f}×",
                    "target": f"≥ {minimum:.1f}×",
                    "met": ratio >= minimum,
                }
    return targets


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
