"""The apps as an installed package: console scripts that work from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

SCRIPTS = {
    "ppma-classify": "apps.classify.cli:main",
    "ppma-segment": "apps.segment.cli:main",
    "ppma-detect": "apps.detect.cli:main",
}


def _installed_scripts() -> dict[str, str]:
    try:
        dist = metadata.distribution("ppma-apps")
    except metadata.PackageNotFoundError:
        pytest.skip("ppma-apps is not installed: `pip install --no-build-isolation -e apps`")
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}


def test_console_scripts_point_at_the_cli_entry_points() -> None:
    assert _installed_scripts() == SCRIPTS


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_help_runs_from_another_directory(script: str, tmp_path: Path) -> None:
    _installed_scripts()
    exe = Path(sys.executable).parent / script
    if not exe.exists():
        found = shutil.which(script)
        if found is None:
            pytest.skip(f"{script} is not on PATH")
        exe = Path(found)
    # Another directory, and nothing of the checkout on the path: the installed package runs.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(exe), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "eval" in result.stdout and "predict" in result.stdout


def test_the_apps_choose_passive_openmp_waiting_unless_the_user_set_a_policy() -> None:
    code = "import os, apps; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    root = str(Path(__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True)
    assert run.stdout.decode().strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True)
    assert run.stdout.decode().strip() == "ACTIVE"
