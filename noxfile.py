"""Developer sessions for the ppma monorepo.

    nox -s tests        every package's tests (builds the native extension)
    nox -s lint         ruff
    nox -s experiments  ppma_mask theory experiments (scaling table + figures)
    nox -s bench        ppma_ops: native ops vs reference / SDPA / FlexAttention (docs/design.md §6)
    nox -s bench_depthwise ppma_ops: native depthwise convolution vs F.conv2d (oneDNN)
    nox -s bench_models ppma_models: T/S/B images/s and memory, native vs reference ops
    nox -s demo         apps.classify: train a PPMA on Fashion-MNIST, print the test accuracy
    nox -s segment_demo apps.segment: train + evaluate on the built-in Fashion-MNIST scenes
    nox -s segment_bench PPMA-T + UPerNet at 512x512, forward+backward, native vs reference

Session virtualenvs are reused, so a second run only re-installs what changed.
"""

from __future__ import annotations

import json
import os
import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
TORCH = "torch==2.13.0"  # the CPU wheel on local disk; an unpinned torch pulls a CUDA build
RUNTIME_DEPS = ["numpy", "scipy", "matplotlib", "safetensors", "pillow", "tqdm", "scikit-learn"]
BUILD_DEPS = ["scikit-build-core>=0.10", "pybind11>=2.12", "setuptools>=69", "wheel"]
TEST_DEPS = ["pytest", "hypothesis"]


def install_packages(session: nox.Session, *, ops: bool = True, models: bool = True) -> None:
    """Install torch (pinned) and the workspace packages into the session venv.

    ppma-mask and ppma-models are pure Python and installed editable. ppma-ops compiles its
    extension against the already-installed torch (no build isolation) into a persistent
    build directory, so a re-run is an incremental CMake build.
    """
    session.install(TORCH, *RUNTIME_DEPS, *BUILD_DEPS, *TEST_DEPS)
    session.install("--no-build-isolation", "-e", "packages/ppma-mask")
    if ops:
        env = {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        session.install("--no-build-isolation", "packages/ppma-ops", env=env)
    if models:
        session.install("--no-build-isolation", "-e", "packages/ppma-models")


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def ensure_fashion_mnist(session: nox.Session) -> None:
    """Install the Debian package with the Fashion-MNIST IDX files when it is missing."""
    if os.path.isdir(FASHION_MNIST_DIR):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        session.error(
            "Fashion-MNIST not found: run `sudo apt-get install dataset-fashion-mnist` "
            "(or pass --data-dir with the IDX files to the app)"
        )
    session.run("apt-get", "update", "-qq", external=True)
    session.run("apt-get", "install", "-y", "-qq", "dataset-fashion-mnist", external=True)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the tests of every package and the cross-package tests."""
    install_packages(session)
    session.run("pytest", *(session.posargs or []))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Static checks (ruff lint + format check)."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def experiments(session: nox.Session) -> None:
    """Theory experiments of ppma_mask: scaling of the three L·x methods, and mask figures."""
    session.install("numpy", "scipy", "matplotlib", "setuptools>=69")
    session.install("--no-build-isolation", "-e", "packages/ppma-mask")
    out = session.posargs[0] if session.posargs else "runs/experiments"
    session.run("python", "-m", "ppma_mask.experiments", "scaling", "--out", out)
    session.run("python", "-m", "ppma_mask.experiments", "figures", "--out", out)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """ppma_ops operator benchmark: native vs reference, SDPA+mask and FlexAttention.

    Writes benchmarks/ops.json and benchmarks/ops.md; extra arguments go to the script
    (e.g. ``nox -s bench -- --quick`` or ``-- --no-flex``).
    """
    install_packages(session, models=False)
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    script = "packages/ppma-ops/benchmarks/bench_ops.py"
    session.run("python", script, "--out", "benchmarks", *session.posargs, env=env)


@nox.session(python=PYTHON)
def bench_depthwise(session: nox.Session) -> None:
    """ppma_ops depthwise convolution: native kernel vs F.conv2d at the models' shapes.

    Writes benchmarks/depthwise.json and benchmarks/depthwise.md (``-- --quick``: 3 shapes).
    """
    install_packages(session, models=False)
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    script = "packages/ppma-ops/benchmarks/bench_depthwise.py"
    session.run("python", script, "--out", "benchmarks", *session.posargs, env=env)


@nox.session(python=PYTHON)
def bench_models(session: nox.Session) -> None:
    """PPMA-T/S/B images/s and peak memory, native vs reference attention (ppma_models).

    Writes benchmarks/models.json and benchmarks/models.md; extra arguments go to the script
    (e.g. ``nox -s bench_models -- --quick``).
    """
    install_packages(session)
    # Passive OpenMP waiting: with other jobs on the cores, spinning barriers distort timings.
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    script = "packages/ppma-models/benchmarks/bench_models.py"
    session.run("python", script, "--out", "benchmarks", *session.posargs, env=env)


# The recipe recorded in the README (Segmentation app). A three-stage ppma_nano (64x64 scenes ->
# 16x16, 8x8 and 4x4 token grids: criss-cross, criss-cross, vanilla; a fourth stage would be
# 2x2) under UPerNet(48) with the auxiliary head on stage 2. The head fuses its levels with a
# 1x1 conv instead of UPerNet's 3x3 (that conv was over a third of the multiply-adds; the 1x1
# trains ~15% more images/s and scored the same per image) and has no dropout. Scenes already
# vary position and scale, so the crop keeps the canvas (scale range 1..1) and only flips are
# added. Two single-threaded DDP processes: at these sizes the two cores do ~25% more work that
# way than one process with two threads. Batches of 12 per process (lr scaled with the batch)
# train ~19% more images/s than batches of 8 (per-step overheads of a small model). 40,000
# scenes x 3 epochs is what fits the 20 minutes; README "Demo result" has what else was tried.
SEGMENT_DEMO = [
    "--data", "scenes", "--canvas", "64", "--train-scenes", "40000", "--val-scenes", "500",
    "--epochs", "3", "--batch-size", "12", "--channels", "48", "--aux-channels", "32",
    "--fuse-kernel", "1", "--head-dropout", "0",
    "--lr", "3e-3", "--schedule", "poly", "--warmup-steps", "100", "--ema-decay", "0.999",
    "--scale-range", "1", "1", "--no-progress", "--backbone", "ppma_nano",
    "--model-arg", "dims=32,64,128", "--model-arg", "depths=1,2,2", "--model-arg", "heads=2,4,4",
    "--model-arg", "mlp_ratios=3,3,3", "--model-arg", "attention_kinds=X,X,V",
    "--model-arg", "layer_scale=false,false,false",
]  # fmt: skip
SEGMENT_DEMO_PROCESSES = 2
SEGMENT_DEMO_TTA_SCALES = ["0.75", "0.875", "1", "1.125", "1.25"]  # with --flip: ten views


# apps.classify demo recipe: a three-stage PPMA (0.42 M parameters; 28x28 input -> 7x7, 4x4 and
# 2x2 token grids: criss-cross, criss-cross, vanilla attention) trained with AdamW, warmup +
# cosine and label smoothing. No crop/flip augmentation and no drop path: in a schedule this
# short the model underfits, and with them it learned markedly slower (README). 5 % of the
# training images are held out to pick the best epoch; the test split is only used by eval.
FASHION_DEMO = [
    "--data", "fashion-mnist", "--epochs", "7", "--batch-size", "128", "--lr", "3e-3",
    "--warmup-epochs", "0.3", "--drop-path", "0", "--label-smoothing", "0.1",
    "--augment", "none", "--val-fraction", "0.05", "--seed", "0",
    "--model", "ppma_nano", "--model-arg", "dims=32,64,128", "--model-arg", "depths=1,2,1",
    "--model-arg", "heads=2,4,4", "--model-arg", "mlp_ratios=3,3,3",
    "--model-arg", "attention_kinds=X,X,V", "--model-arg", "layer_scale=false,false,false",
    "--model-arg", "head_hidden=256",
]  # fmt: skip


def _demo_report(path: str) -> dict | None:
    """A demo's JSON report; None under ``nox --install-only``, which skips the runs (a run
    that fails raises before the report is read)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """apps.classify end to end: train on Fashion-MNIST, evaluate on its 10,000 test images.

    Run directory: runs/demo-fashion-mnist (or the first extra argument); further extra
    arguments go to ``train`` (e.g. ``nox -s demo -- runs/fm --epochs 1``).
    """
    import time

    install_packages(session)
    ensure_fashion_mnist(session)
    out = session.posargs[0] if session.posargs else "runs/demo-fashion-mnist"
    extra = session.posargs[1:]
    # Passive OpenMP waits: with other processes on the two cores, spinning threads cost ~4x.
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    start = time.perf_counter()
    session.run("python", "-m", "apps.classify", "train", *FASHION_DEMO, *extra, "--out", out,
                env=env)  # fmt: skip
    report_dir = os.path.join(out, "eval-test")
    session.run("python", "-m", "apps.classify", "eval", "--checkpoint",
                os.path.join(out, "best.safetensors"), "--data", "fashion-mnist",
                "--out", report_dir, "--no-progress", env=env)  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    report = _demo_report(os.path.join(report_dir, "report.json"))
    if report is not None:
        session.log(
            f"Fashion-MNIST test accuracy: {report['top1']:.2%} (10,000 images); training + "
            f"evaluation took {minutes:.1f} min (package installation not counted)"
        )


@nox.session(python=PYTHON)
def segment_demo(session: nox.Session) -> None:
    """apps.segment end to end: train on built-in scenes, evaluate on held-out scenes (mIoU).

    Run directory: runs/segment_demo (or the first extra argument); further extra arguments
    go to ``train`` (e.g. ``nox -s segment_demo -- runs/seg --epochs 2``).
    """
    import time

    install_packages(session)
    ensure_fashion_mnist(session)
    out = session.posargs[0] if session.posargs else "runs/segment_demo"
    extra = session.posargs[1:]
    passive = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    procs = str(SEGMENT_DEMO_PROCESSES)
    session.run("python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", procs,
                "-m", "apps.segment", "train", *SEGMENT_DEMO, *extra, "--out", out,
                env={"OMP_WAIT_POLICY": passive, "OMP_NUM_THREADS": "1"})  # fmt: skip
    # Single-scale scores are printed per epoch by train; the final eval adds MMSeg's aug test.
    evaluate = ["eval", out, "--data", "scenes", "--val-scenes", "500", "--flip", "--scales",
                *SEGMENT_DEMO_TTA_SCALES, "--out", f"{out}/eval"]  # fmt: skip
    session.run("python", "-m", "apps.segment", *evaluate, "--no-progress",
                env={"OMP_WAIT_POLICY": passive})  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    report = _demo_report(os.path.join(out, "eval", "eval.json"))
    if report is not None:
        session.log(
            f"held-out mIoU {report['miou']:.2%} (500 scenes, multi-scale + flip test-time "
            "augmentation; single-scale per epoch in metrics.jsonl); "
            f"training + evaluation took {minutes:.1f} min (package installation not counted)"
        )


@nox.session(python=PYTHON)
def segment_bench(session: nox.Session) -> None:
    """PPMA-T + UPerNet(512) on a 512x512 image, forward+backward: time and peak memory of the
    native vs the reference attention ops. Writes benchmarks/segment_512.{json,md}."""
    install_packages(session)
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    session.run("python", "benchmarks/segment_512.py", "--out", "benchmarks", *session.posargs,
                env=env)  # fmt: skip


TORCH_CUDA = "torch==2.14.1"  # a CUDA 13.0 build on local disk (~5.5 GB, installed once)
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
# Fails loudly unless every forward and backward op has a CUDA kernel in the loaded library.
CUDA_REGISTRATION_CHECK = """
import torch, ppma_ops
from ppma_ops import _native
assert _native.native_load_error() is None, _native.native_load_error()
info = ppma_ops._native._C.build_info()
assert info["cuda"], f"ppma_ops was built without CUDA kernels: {info}"
ops = ["polyline_attention_fwd", "polyline_attention_backward", "criss_cross_attention_fwd",
       "criss_cross_attention_backward", "criss_cross_attention_inference", "polyline_scan",
       "polyline_scan_backward"]
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ppma::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for: {missing}"
print(f"ppma_ops CUDA kernels registered for {len(ops)} ops (torch {torch.__version__})")
"""


@nox.session(python=PYTHON)
def cuda_build(session: nox.Session) -> None:
    """Compile the CUDA kernels with nvcc against torch 2.14.1 (CUDA 13.0); check they register.

    Needs no GPU: it proves the CUDA sources compile, link and register on the CUDA key.
    Only the portable CPU ISA is built here, to keep the compile short.
    """
    session.install(TORCH_CUDA, "numpy", *BUILD_DEPS)
    # libnvrtc ships in torch's nvidia-* wheels, not in the toolkit's lib64 on this machine.
    nvrtc = session.run(
        "python",
        "-c",
        "import glob, os, torch; root = os.path.dirname(os.path.dirname(torch.__file__)); "
        "print(sorted(glob.glob(f'{root}/nvidia/**/libnvrtc.so*', recursive=True))[0])",
        silent=True,
    ).strip()
    build_dir = os.path.join(session.virtualenv.location, "ppma-ops-build")
    env = {
        "PATH": f"{CUDA_HOME}/bin{os.pathsep}{os.environ['PATH']}",
        "CUDACXX": f"{CUDA_HOME}/bin/nvcc",
        # torch's CMake config takes GPU architectures from here (not CMAKE_CUDA_ARCHITECTURES).
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"),
        "CMAKE_BUILD_PARALLEL_LEVEL": "2",
    }
    session.install(
        "--no-build-isolation",
        f"-Cbuild-dir={build_dir}",
        f"-Ccmake.define.CUDA_nvrtc_LIBRARY={nvrtc}",
        "-Ccmake.define.PPMA_CPU_ISAS=DEFAULT",
        "packages/ppma-ops",
        env=env,
    )
    session.run("python", "-c", CUDA_REGISTRATION_CHECK)
