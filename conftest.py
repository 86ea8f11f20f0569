"""Shared pytest configuration: Hypothesis profiles and the location of the official fixtures."""

import json
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


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _have_fashion_mnist() -> bool:
    return any((FASHION_MNIST_DIR / f"t10k-images-idx3-ubyte{x}").is_file() for x in ("", ".gz"))


FASHION_MNIST_SKIP = (
    f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}: "
    "run `sudo apt-get install dataset-fashion-mnist` (nox -s tests does when run as root)"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fashion_mnist: reads the Fashion-MNIST files (skipped when not installed)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _have_fashion_mnist():
        return
    skip = pytest.mark.skip(reason=FASHION_MNIST_SKIP)
    for item in items:
        if item.get_closest_marker("fashion_mnist") is not None:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write how many tests were skipped for missing data where PPMA_SKIP_REPORT points, so
    `nox -s tests` can say so in its last line."""
    path = os.environ.get("PPMA_SKIP_REPORT")
    if not path:
        return
    marked = [item for item in session.items if item.get_closest_marker("fashion_mnist")]
    count = 0 if _have_fashion_mnist() else len(marked)
    Path(path).write_text(json.dumps({"fashion_mnist": count}))
