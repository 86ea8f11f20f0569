"""torch.compile with Inductor: one graph, eager's results, one inference compilation for many
sizes.

The oracle is the same model run eagerly. These tests compile for real (C++ code generation),
which takes a minute or more on a small machine.
"""

from __future__ import annotations

import pytest
import torch
from ppma_models import compile_model
from ppma_models.testing import TINY_CONFIG, relative_error, seeded_model

TOL = 1e-5
# Two input sizes whose grids differ at every stage (stride 4 and 8 here).
FIRST, SECOND = (2, 3, 64, 48), (3, 3, 40, 72)


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_inference_equals_eager_at_two_sizes_with_one_compilation():
    model = seeded_model(TINY_CONFIG, num_classes=5).eval()
    compiled = compile_model(model)  # fullgraph: any graph break fails
    with torch.no_grad():
        x = torch.randn(FIRST)
        assert relative_error(compiled(x), model(x)) <= TOL
        with torch._dynamo.config.patch(error_on_recompile=True):
            x = torch.randn(SECOND)
            assert relative_error(compiled(x), model(x)) <= TOL


def _gradients(model: torch.nn.Module, fn, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = fn(x)
    out.logsumexp(-1).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_training_step_equals_eager_at_two_sizes():
    # The training graph is compiled again for the second size: Inductor specialises the
    # backward on the first stage's grid (a channels-last contiguity check in its lowering).
    model = seeded_model(TINY_CONFIG, num_classes=5).train()  # no drop path: deterministic
    compiled = compile_model(model)
    for size in (FIRST, SECOND):
        x = torch.randn(size)
        out, grads = _gradients(model, compiled, x)
        expected_out, expected = _gradients(model, model, x)
        assert relative_error(out, expected_out) <= TOL
        # Against the largest gradient: biases that feed a BatchNorm have a true gradient of
        # zero, so their own entries are rounding noise in both runs.
        scale = max(g.abs().max() for g in expected.values())
        for name, g in expected.items():
            assert (grads[name] - g).abs().max() <= TOL * scale, name


def test_other_backends_take_no_inductor_options():
    with pytest.raises(ValueError, match="Inductor settings"):
        compile_model(torch.nn.Identity(), backend="aot_eager", options={"freezing": True})
