"""Shared fixtures for the ppma_models tests (``reference_dir`` comes from the root conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ppma_models import testing


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these small-shape tests on one thread.

    At these sizes a second thread gains little, and on a shared, oversubscribed machine
    OpenMP's spin-waiting barriers made two threads 10-50× slower than one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def small_fixture(reference_dir: Path) -> dict:
    """The official shrunken PPMAViT: kwargs, upstream state dict, input and outputs."""
    arrays = load_npz(reference_dir / "ppma_small_config.npz")
    meta = json.loads((reference_dir / "ppma_small_config.json").read_text())
    state = {
        k[len("state/") :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("state/")
    }
    return {
        "kwargs": meta["model_kwargs"],
        "state": state,
        "input": torch.from_numpy(arrays["input"]),
        "logits": torch.from_numpy(arrays["output/logits"]),
        "pooled": torch.from_numpy(arrays["output/pooled_features"]),
    }


@pytest.fixture(scope="session")
def relative_error():
    """max |a − b| / max |b| (:func:`ppma_models.testing.relative_error`)."""
    return testing.relative_error
