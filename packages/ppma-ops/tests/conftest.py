"""Shared fixtures for the ppma_ops tests.

``official_attention`` runs one of the authors' attention fixtures (docs/design.md §3) through a
test-side module around an op: q/k/v projections (k scaled by d^-½, the op called with
scale 1), the shared decay head, 1-D RoPE over the flat token index, LePE and out_proj
(docs/design.md §2.1–2.4). The real modules live in ppma_models; this copy keeps the op tests free
of that dependency. ``no_compile_caches`` turns off torch.compile's on-disk caches for the
compiled-op tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

Attention = Callable[..., torch.Tensor]  # (q, k, v, log_alpha, log_beta) -> out


def _module_output(
    path: Path, attention: Attention, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as z:
        state = {
            n[len("state/") :]: torch.tensor(z[n]).to(dtype)
            for n in z.files
            if n.startswith("state/")
        }
        x = torch.tensor(z["input"]).to(dtype)
        expected = torch.tensor(z["output/y"]).to(dtype)
    b, h, w, c = x.shape
    heads = state["path_embed.A_log"].numel()
    d = c // heads

    def linear(name: str, t: torch.Tensor) -> torch.Tensor:
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) → (B, heads, H, W, d)
        return t.view(b, h, w, heads, d).permute(0, 3, 1, 2, 4)

    q, k, v = linear("q_proj", x), linear("k_proj", x) * d**-0.5, linear("v_proj", x)
    delta = x.view(b, h, w, heads, d) @ state["path_embed.dt_linear.weight"].T  # (..., 2)
    rate = -torch.exp(state["path_embed.A_log"])
    dt_bias = state["path_embed.dt_bias"]
    log_alpha = (rate * F.softplus(delta[..., 0] + dt_bias)).permute(0, 3, 1, 2).contiguous()
    log_beta = (rate * F.softplus(delta[..., 1] + dt_bias)).permute(0, 3, 1, 2).contiguous()
    theta = (1.0 / 10000 ** torch.linspace(0, 1, d // 2, dtype=dtype)).repeat_interleave(2)
    angle = torch.arange(h * w, dtype=dtype)[:, None] * theta[None]
    sin, cos = angle.sin().view(h, w, d), angle.cos().view(h, w, d)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t = split_heads(t)
        pairs = torch.stack([-t[..., 1::2], t[..., 0::2]], dim=-1).flatten(-2)
        return t * cos + pairs * sin

    out = attention(rotate(q), rotate(k), split_heads(v), log_alpha, log_beta)
    out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
    lepe = F.conv2d(
        v.permute(0, 3, 1, 2), state["lepe.conv.weight"], state["lepe.conv.bias"], padding=2,
        groups=c,
    ).permute(0, 2, 3, 1)  # fmt: skip
    return linear("out_proj", out + lepe), expected


@pytest.fixture(scope="session")
def official_attention(reference_dir: Path):
    """``run(kind, attention, dtype=torch.float32) -> (y, expected)`` for kind whole|chunk."""

    def run(
        kind: str, attention: Attention, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _module_output(reference_dir / f"attention_{kind}.npz", attention, dtype)

    return run


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
