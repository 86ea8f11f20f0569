"""The parent side of the one-step benchmarks that time the native against the reference PPMA
ops, each measurement in a fresh subprocess (so that its peak resident memory is its own),
the two implementations alternating round by round: options, running the children, medians,
the report and its Markdown table. A script adds its ``measure`` (the child's work, printing
one JSON line with ``wall_s``, ``cpu_s``, ``peak_rss_mib``, ``model_rss_mib``,
``native_used``) and its own options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["IMPLS", "add_run_options", "run_interleaved", "write_report"]

IMPLS = ("native", "reference")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--steps, --rounds, --threads, --timeout, --out and the hidden --child."""
    parser.add_argument("--steps", type=int, default=1, help="timed steps per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--out", default="benchmarks", help="directory for JSON + MD")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)


def _run_child(script: str, impl: str, child_args: Sequence[str], args) -> dict:
    cmd = [sys.executable, script, "--child", impl, *child_args, "--steps", str(args.steps)]
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


def run_interleaved(script: str, child_args: Sequence[str], args: argparse.Namespace) -> dict:
    """Run ``script --child IMPL *child_args`` for both implementations, ``args.rounds``
    times, alternating which goes first; returns the report (config, machine, medians, runs
    and the reference/native ratios when both ran)."""
    import torch

    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for r in range(args.rounds):
        for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
            result = _run_child(script, impl, child_args, args)
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
    return report


def _markdown(report: dict, title: str, column: str) -> str:
    cfg = report["config"]
    lines = [
        f"# {title}",
        "",
        f"{report['machine']}; torch {report['torch']}; {cfg['rounds']} interleaved rounds × "
        f"{cfg['steps']} step(s) per implementation, medians.",
        "",
        f"| {column} | median wall (s) | median CPU (s) | peak RSS (MiB) | added by the step "
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


def write_report(report: dict, out: str, stem: str, title: str, column: str) -> None:
    """Write ``out/<stem>.json`` and ``out/<stem>.md`` (a table headed ``title``, first
    column ``column``) and print the table."""
    markdown = _markdown(report, title, column)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (path / f"{stem}.md").write_text(markdown)
    print(markdown)
