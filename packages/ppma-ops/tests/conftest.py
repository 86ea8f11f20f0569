"""Shared fixtures for the ppma_ops tests.

Tests that take a ``device`` run on the CPU and, where a GPU is present, on CUDA
(``ppma_ops.testing.DEVICES``); their CUDA cases and the CUDA-only tests carry the ``cuda``
marker. ``no_compile_caches`` turns off torch.compile's on-disk caches for the compiled-op
tests; ``set_threads`` changes the thread count for one test.
"""

from __future__ import annotations

import ppma_ops
import pytest
import torch
from ppma_ops._native import CUDA_KERNEL_OPS


@pytest.fixture(autouse=True)
def _cuda_kernels_registered(request) -> None:
    """On a GPU, a library without the CUDA kernels is a build failure, not a reason to skip."""
    if request.node.get_closest_marker("cuda") is None or not torch.cuda.is_available():
        return
    assert ppma_ops.native_available(), f"native library not loaded: {ppma_ops.native_load_error()}"
    missing = [
        op
        for op in CUDA_KERNEL_OPS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ppma::{op}", "CUDA")
    ]
    assert not missing, f"no CUDA kernel registered for {missing}"


@pytest.fixture
def set_threads():
    """torch.set_num_threads for the test; the previous thread count is restored after it."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.fixture
def no_compile_caches():
    """Compiled graphs cached on disk by an earlier build of the ops (another schema) would be
    reused: their cache keys do not cover custom-op schemas."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with (
        inductor_config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        yield
