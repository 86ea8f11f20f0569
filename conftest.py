"""Shared pytest configuration: Hypothesis profiles and the location of the official fixtures."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

_REPO = Path(__file__).resolve().parent

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The authors' reference data (docs/design.md §3): shared/reference, in or next to the repo."""
    for root in (_REPO / "shared", _REPO.parent / "shared"):
        if (root / "reference").is_dir():
            return root / "reference"
    raise FileNotFoundError(
        f"official reference data not found: looked for shared/reference in {_REPO} and "
        f"{_REPO.parent}; these tests need the fixtures described in docs/design.md §3"
    )
