"""Developer sessions for the ppma monorepo.

    nox -s tests           every package's tests (builds the native extension)
    nox -s lint            ruff
    nox -s experiments     ppma_mask theory experiments (scaling table + figures)
    nox -s demo            ppma-classify: train a PPMA on Fashion-MNIST, print the test accuracy
    nox -s segment_demo    ppma-segment: train + evaluate on the built-in Fashion-MNIST scenes
    nox -s bench           ppma_ops: native ops vs reference / SDPA / FlexAttention
    nox -s bench_depthwise ppma_ops: native depthwise convolution vs F.conv2d (oneDNN)
    nox -s bench_models    ppma_models: T/S/B images/s and memory, native vs reference ops
    nox -s segment_bench   PPMA-T + UPerNet at 512x512, forward+backward, native vs reference
    nox -s detect_demo     ppma-detect: Mask R-CNN on built-in instance scenes, box and mask AP
    nox -s detect_bench    mask_rcnn_ppma_tiny at 800x1333, forward+backward, native vs reference
    nox -s bench_onnx      ppma_models: an exported ONNX file in onnxruntime vs the native ops
    nox -s cuda_build      compile the CUDA kernels with nvcc and check that they register

Every session but lint, experiments and cuda_build runs in one shared environment,
.nox/ppma-stack (torch 2.14.1 + torchvision 0.29.1, ~5.5 GB), set up by the first of them;
later sessions skip each install step whose inputs did not change (docs/design.md §4).
The benchmark sessions regenerate docs/benchmarks.md from the results in benchmarks/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).resolve().parent
PYTHON = "3.11"
# One stack for every session: the torchvision that runs on these machines is a CUDA build
# (it also runs on the CPU), and it needs exactly this torch. Package metadata stays unpinned.
STACK = ["torch==2.14.1", "torchvision==0.29.1"]
RUNTIME_DEPS = ["numpy", "scipy", "matplotlib", "safetensors", "pillow", "tqdm", "scikit-learn"]
RUNTIME_DEPS += ["pycocotools"]  # ppma-detect's COCO masks and AP (and its tests)
BUILD_DEPS = [
    "scikit-build-core>=0.10",
    "pybind11>=2.12",
    "setuptools>=69",
    "wheel",
    "cmake>=3.18",
    "ninja",
]
TEST_DEPS = ["pytest", "hypothesis", "timm", "onnx", "onnxscript", "onnxruntime"]

# The stack is ~5.5 GB, so every session that needs it shares this one environment.
SHARED_ENV = ROOT / ".nox" / "ppma-stack"
OPS_SOURCES = ["CMakeLists.txt", "pyproject.toml", "cmake", "csrc", "src"]


def _python311() -> str:
    """The interpreter for the shared environment: the local wheels are built for 3.11."""
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = shutil.which(f"python{PYTHON}")
    if found is None:
        raise SystemExit(f"the ppma nox sessions need Python {PYTHON} (python{PYTHON} on PATH)")
    return found


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock, so two nox runs never install into one environment at once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _digest(*parts: str | Path) -> str:
    """A hash of strings and of files' contents (folders: every file below, in order)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(part.rglob("*")) if part.is_dir() else [part]
            for f in files:
                if f.is_file() and "__pycache__" not in f.parts:
                    h.update(str(f.relative_to(ROOT)).encode())
                    h.update(f.read_bytes())
        else:
            h.update(part.encode())
    return h.hexdigest()


def _step(
    session: nox.Session, name: str, key: str, install: list[list[str]], note: str = ""
) -> None:
    """Run pip with each argument list unless the same step already ran with the same key."""
    stamp = SHARED_ENV / f".{name}.stamp"
    if stamp.is_file() and stamp.read_text() == key:
        session.log(f"{name}: up to date")
        return
    if note:
        session.log(note)
    python = str(SHARED_ENV / "bin" / "python")
    for args in install:
        session.run(python, "-m", "pip", "install", *args, external=True)
    stamp.write_text(key)


def shared_env(session: nox.Session, *, ops: bool = True) -> dict[str, str]:
    """Create or update the shared environment; return the variables that make it the one
    that ``session.run`` uses (its bin/ first on PATH).

    Each install step is skipped when its inputs are unchanged, so a second session starts at
    once: ppma-ops is rebuilt only when its sources change, incrementally, in a build folder
    that belongs to this environment (never the source tree, so environments never collide).
    """
    ops_dir = ROOT / "packages" / "ppma-ops"
    with _locked(SHARED_ENV.with_suffix(".lock")):
        if not (SHARED_ENV / "bin" / "python").exists():
            session.run(_python311(), "-m", "venv", str(SHARED_ENV), external=True)
        deps = [*STACK, *RUNTIME_DEPS, *BUILD_DEPS, *TEST_DEPS]
        _step(session, "dependencies", _digest(*deps), [["-q", *deps]])
        pure = ["packages/ppma-mask", "packages/ppma-models", "apps"]
        pyprojects = [ROOT / p / "pyproject.toml" for p in pure]
        editable = ["--no-build-isolation", "--no-deps", "-q"]
        _step(session, "packages", _digest(*pyprojects), [[*editable, "-e", p] for p in pure])
        if ops:
            pip_args = [
                "--no-build-isolation", "--no-deps", "-v",  # -v: the compile's progress
                f"-Cbuild-dir={SHARED_ENV / 'ppma-ops-build'}", "-Ccmake.define.PPMA_CUDA=AUTO",
                str(ops_dir),
            ]  # fmt: skip
            key = _digest(*(ops_dir / part for part in OPS_SOURCES))
            note = "ppma-ops: building (cold: 2-5 min, kernels compiled for several CPU types)"
            _step(session, "ppma-ops", key, [pip_args], note=note)
    bin_dir = str(SHARED_ENV / "bin")
    return {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "VIRTUAL_ENV": str(SHARED_ENV),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        # With other processes on the cores, spinning OpenMP waits cost up to 4x.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }


def stack(program: str) -> str:
    """The path of a program of the shared environment (nox would look it up on its own PATH)."""
    return str(SHARED_ENV / "bin" / program)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HINT = "sudo apt-get install dataset-fashion-mnist"


def ensure_fashion_mnist(session: nox.Session, *, required: bool) -> bool:
    """Install the Debian package with the Fashion-MNIST IDX files when it is missing and we
    can (root with apt). Returns whether it is there; errors when ``required`` and it is not."""
    if any(os.path.isfile(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte{x}") for x in ("", ".gz")):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get") is not None:
        session.run("apt-get", "update", "-qq", external=True)
        session.run("apt-get", "install", "-y", "-qq", "dataset-fashion-mnist", external=True)
        return True
    if required:
        session.error(
            f"Fashion-MNIST not found: run `{FASHION_MNIST_HINT}` "
            "(or pass --data-dir with the IDX files to the app)"
        )
    return False


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the tests of every package and the cross-package tests."""
    env = shared_env(session)
    have_data = ensure_fashion_mnist(session, required=False)
    skips = SHARED_ENV / "skipped-for-data.json"
    skips.unlink(missing_ok=True)
    env["PPMA_SKIP_REPORT"] = str(skips)
    session.run(stack("pytest"), *(session.posargs or []), env=env)
    if not have_data and skips.is_file():
        count = json.loads(skips.read_text())["fashion_mnist"]
        session.log(f"{count} tests skipped: Fashion-MNIST is missing; run `{FASHION_MNIST_HINT}`")


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


def _benchmark(session: nox.Session, script: str) -> None:
    """Run a benchmark script (results to benchmarks/), then regenerate docs/benchmarks.md."""
    env = shared_env(session)
    session.run(stack("python"), script, "--out", "benchmarks", *session.posargs, env=env)
    session.run(stack("python"), "benchmarks/render_docs.py", env=env)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """ppma_ops operator benchmark: native vs reference, SDPA+mask and FlexAttention.

    Writes benchmarks/ops.{json,md}; extra arguments go to the script
    (e.g. ``nox -s bench -- --quick`` or ``-- --no-flex``).
    """
    _benchmark(session, "packages/ppma-ops/benchmarks/bench_ops.py")


@nox.session(venv_backend="none")
def bench_depthwise(session: nox.Session) -> None:
    """ppma_ops depthwise convolution: native kernel vs F.conv2d at the models' shapes.

    Writes benchmarks/depthwise.{json,md} (``-- --quick``: 3 shapes).
    """
    _benchmark(session, "packages/ppma-ops/benchmarks/bench_depthwise.py")


@nox.session(venv_backend="none")
def bench_models(session: nox.Session) -> None:
    """PPMA-T/S/B images/s and peak memory, native vs reference attention (ppma_models).

    Writes benchmarks/models.{json,md}; extra arguments go to the script
    (e.g. ``nox -s bench_models -- --quick``).
    """
    _benchmark(session, "packages/ppma-models/benchmarks/bench_models.py")


# The recipe recorded in docs/demos.md (Segmentation). A three-stage ppma_nano (64x64 scenes ->
# 16x16, 8x8 and 4x4 token grids: criss-cross, criss-cross, vanilla; a fourth stage would be
# 2x2) under UPerNet(48) with the auxiliary head on stage 2. The head fuses its levels with a
# 1x1 conv instead of UPerNet's 3x3 (that conv was over a third of the multiply-adds; the 1x1
# trains ~15% more images/s and scored the same per image) and has no dropout. Scenes already
# vary position and scale, so the crop keeps the canvas (scale range 1..1) and only flips are
# added. Two single-threaded DDP processes: at these sizes the two cores do ~25% more work that
# way than one process with two threads. Batches of 12 per process (lr scaled with the batch)
# train ~19% more images/s than batches of 8 (per-step overheads of a small model). 40,000
# scenes x 4 epochs take ~9-12 minutes; docs/demos.md has what else was tried.
SEGMENT_DEMO = [
    "--data", "scenes", "--canvas", "64", "--train-scenes", "40000", "--val-scenes", "500",
    "--epochs", "4", "--batch-size", "12", "--channels", "48", "--aux-channels", "32",
    "--fuse-kernel", "1", "--head-dropout", "0",
    "--lr", "3e-3", "--schedule", "poly", "--warmup-steps", "100", "--ema-decay", "0.999",
    "--scale-range", "1", "1", "--no-progress", "--backbone", "ppma_nano",
    "--model-arg", "dims=32,64,128", "--model-arg", "depths=1,2,2", "--model-arg", "heads=2,4,4",
    "--model-arg", "mlp_ratios=3,3,3", "--model-arg", "attention_kinds=X,X,V",
    "--model-arg", "layer_scale=false,false,false",
]  # fmt: skip
SEGMENT_DEMO_PROCESSES = 2
SEGMENT_DEMO_TTA_SCALES = ["0.75", "0.875", "1", "1.125", "1.25"]  # with --flip: ten views


# apps.classify demo recipe (docs/demos.md): a four-stage PPMA with a stride-2 stem (0.42 M
# parameters; 28x28 input -> 14x14, 7x7, 4x4 and 2x2 token grids: criss-cross x3, vanilla)
# trained with AdamW, warmup + cosine and label smoothing, horizontal flips as the only
# augmentation (shifted crops made it underfit in this schedule), no drop path. 5 % of the
# training images are held out to pick the best epoch; the test split is only used by eval,
# which averages each image with its mirror.
FASHION_DEMO = [
    "--data", "fashion-mnist", "--epochs", "12", "--batch-size", "128", "--lr", "3e-3",
    "--warmup-epochs", "0.3", "--drop-path", "0", "--label-smoothing", "0.1",
    "--augment", "flip", "--val-fraction", "0.05", "--seed", "0",
    "--model", "ppma_nano", "--model-arg", "stem_stride=2", "dims=16,32,64,128",
    "depths=1,1,2,1", "heads=1,2,4,4", "mlp_ratios=3,3,3,3", "attention_kinds=X,X,X,V",
    "layer_scale=false,false,false,false", "head_hidden=256",
]  # fmt: skip


def _demo_report(path: str) -> dict | None:
    """A demo's JSON report; None under ``nox --install-only``, which skips the runs (a run
    that fails raises before the report is read)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """ppma-classify end to end: train on Fashion-MNIST, evaluate on its 10,000 test images.

    Run directory: runs/demo-fashion-mnist (or the first extra argument); further extra
    arguments go to ``train`` (e.g. ``nox -s demo -- runs/fm --epochs 1``).
    """
    import time

    env = shared_env(session)
    ensure_fashion_mnist(session, required=True)
    out = session.posargs[0] if session.posargs else "runs/demo-fashion-mnist"
    extra = session.posargs[1:]
    start = time.perf_counter()
    session.run(stack("ppma-classify"), "train", *FASHION_DEMO, *extra, "--out", out, env=env)
    report_dir = os.path.join(out, "eval-test")
    best = os.path.join(out, "best.safetensors")
    session.run(stack("ppma-classify"), "eval", "--checkpoint", best, "--data", "fashion-mnist",
                "--flip", "--out", report_dir, "--no-progress", env=env)  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    report = _demo_report(os.path.join(report_dir, "report.json"))
    if report is not None:
        session.log(
            f"Fashion-MNIST test accuracy: {report['top1']:.2%} (10,000 images); training + "
            f"evaluation took {minutes:.1f} min (package installation not counted)"
        )


@nox.session(venv_backend="none")
def segment_demo(session: nox.Session) -> None:
    """ppma-segment end to end: train on built-in scenes, evaluate on held-out scenes (mIoU).

    Run directory: runs/segment_demo (or the first extra argument); further extra arguments
    go to ``train`` (e.g. ``nox -s segment_demo -- runs/seg --epochs 2``).
    """
    import time

    env = shared_env(session)
    ensure_fashion_mnist(session, required=True)
    out = session.posargs[0] if session.posargs else "runs/segment_demo"
    extra = session.posargs[1:]
    start = time.perf_counter()
    procs = str(SEGMENT_DEMO_PROCESSES)
    torchrun = [stack("python"), "-m", "torch.distributed.run", "--standalone"]
    train = ["-m", "apps.segment", "train", *SEGMENT_DEMO, *extra, "--out", out]
    session.run(*torchrun, "--nproc-per-node", procs, *train, env={**env, "OMP_NUM_THREADS": "1"})
    # Single-scale scores are printed per epoch by train; the final eval adds MMSeg's aug test.
    evaluate = ["eval", out, "--data", "scenes", "--val-scenes", "500", "--flip", "--scales",
                *SEGMENT_DEMO_TTA_SCALES, "--out", f"{out}/eval"]  # fmt: skip
    session.run(stack("ppma-segment"), *evaluate, "--no-progress", env=env)
    minutes = (time.perf_counter() - start) / 60
    report = _demo_report(os.path.join(out, "eval", "eval.json"))
    if report is not None:
        session.log(
            f"held-out mIoU {report['miou']:.2%} (500 scenes, multi-scale + flip test-time "
            "augmentation; single-scale per epoch in metrics.jsonl); "
            f"training + evaluation took {minutes:.1f} min (package installation not counted)"
        )


@nox.session(venv_backend="none")
def segment_bench(session: nox.Session) -> None:
    """PPMA-T + UPerNet(512) on a 512x512 image, forward+backward: time and peak memory of the
    native vs the reference attention ops. Writes benchmarks/segment_512.{json,md}."""
    _benchmark(session, "benchmarks/segment_512.py")


# The recipe recorded in docs/demos.md (Detection). Mask R-CNN + FPN(64) on the segment demo's
# three-stage ppma_nano, on the app's scene settings (anchors 4 x stride, small heads, few
# proposals) with three changes: images upscaled to 128x128 (at 64x64 a garment covers 5-10
# cells of the stride-4 map the mask head pools from; 2x is worth ~4 mask AP), a 32-channel
# mask head and 32 RoIs sampled per image (the mask head's convolutions were a third of the
# step; halving both made it 1.5-1.9x faster, which pays for the larger images). Batches of 4
# per process learned more per image than 8 or 16. Two single-threaded DDP processes, as the
# segment demo; 7,500 scenes x 4 epochs take ~11 minutes on a quiet 2-core machine.
# docs/demos.md has what else was tried.
DETECT_DEMO = [
    "--data", "scenes", "--train-scenes", "7500", "--val-scenes", "500", "--epochs", "4",
    "--batch-size", "4", "--lr", "2.5e-3", "--warmup-steps", "100", "--ema-decay", "0.999",
    "--no-progress", "--backbone", "ppma_nano",
    "--model-arg", "dims=32,64,128", "depths=1,2,2", "heads=2,4,4", "mlp_ratios=3,3,3",
    "attention_kinds=X,X,V", "layer_scale=false,false,false",
    "--detector-arg", "min_size=128", "max_size=128", "mask_head_channels=32",
    "box_batch_size_per_image=32",
]  # fmt: skip
DETECT_DEMO_PROCESSES = 2


@nox.session(venv_backend="none")
def detect_demo(session: nox.Session) -> None:
    """ppma-detect end to end: Mask R-CNN trained on built-in instance scenes, box and mask AP
    (COCO's AP at IoU 0.50:0.95) on 500 held-out scenes.

    Run directory: runs/detect_demo (or the first extra argument); further extra arguments
    go to ``train`` (e.g. ``nox -s detect_demo -- runs/det --train-scenes 2000``).
    """
    import time

    env = shared_env(session)
    ensure_fashion_mnist(session, required=True)
    out = session.posargs[0] if session.posargs else "runs/detect_demo"
    extra = session.posargs[1:]
    start = time.perf_counter()
    torchrun = [stack("python"), "-m", "torch.distributed.run", "--standalone"]
    train = ["-m", "apps.detect", "train", *DETECT_DEMO, *extra, "--out", out]
    procs = str(DETECT_DEMO_PROCESSES)
    session.run(*torchrun, "--nproc-per-node", procs, *train, env={**env, "OMP_NUM_THREADS": "1"})
    evaluate = ["eval", out, "--data", "scenes", "--val-scenes", "500", "--out", f"{out}/eval",
                "--no-progress"]  # fmt: skip
    session.run(stack("ppma-detect"), *evaluate, env=env)
    minutes = (time.perf_counter() - start) / 60
    report = _demo_report(os.path.join(out, "eval", "eval.json"))
    if report is not None:
        box, mask = report["box"], report["mask"]
        session.log(
            f"held-out box AP {box['ap']:.1%} (AP50 {box['ap50']:.1%}), mask AP {mask['ap']:.1%} "
            f"(AP50 {mask['ap50']:.1%}) on 500 scenes; training + evaluation took "
            f"{minutes:.1f} min (package installation not counted)"
        )


@nox.session(venv_backend="none")
def detect_bench(session: nox.Session) -> None:
    """mask_rcnn_ppma_tiny (80 classes) on one 800x1333 image, forward+backward: time and peak
    memory of the native vs the reference PPMA ops. Writes benchmarks/detect_800x1333.{json,md}."""
    _benchmark(session, "benchmarks/detect_800x1333.py")


@nox.session(venv_backend="none")
def bench_onnx(session: nox.Session) -> None:
    """PPMA-T exported to ONNX, run in onnxruntime, against PyTorch with the native ops at
    224/512/1024 px: time and peak memory. Writes benchmarks/onnx.{json,md}."""
    _benchmark(session, "benchmarks/onnx_cost.py")


CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
# Fails loudly unless every forward and backward op has a CUDA kernel in the loaded library.
CUDA_REGISTRATION_CHECK = """
import torch, ppma_ops
from ppma_ops import _native
assert _native.native_load_error() is None, _native.native_load_error()
info = ppma_ops._native._C.build_info()
assert info["cuda"], f"ppma_ops was built without CUDA kernels: {info}"
ops = _native.CUDA_KERNEL_OPS
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
    session.install(*STACK, "numpy", *BUILD_DEPS)
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
        "-Ccmake.define.PPMA_CUDA=ON",
        "packages/ppma-ops",
        env=env,
    )
    session.run("python", "-c", CUDA_REGISTRATION_CHECK)
