"""Developer sessions for the ppma monorepo.

    nox -s tests        every package's tests (builds the native extension)
    nox -s lint         ruff
    nox -s experiments  ppma_mask theory experiments (scaling table + figures)

Session virtualenvs are reused, so a second run only re-installs what changed.
"""

from __future__ import annotations

import os

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
