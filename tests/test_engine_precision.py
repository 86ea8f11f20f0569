"""--amp on the CPU: bf16 autocast only where the processor has bf16 arithmetic, float32
(and a line saying so) elsewhere; the decision reaches the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apps.classify.cli import main
from apps.engine import precision, trainer
from apps.engine.precision import cpu_bf16_flags, resolve_amp

X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "flags"),
    [(X86_AVX512_BF16, {"avx512_bf16"}), (X86_AVX2, set()), (ARM_BF16, {"bf16"})],
)
def test_cpu_bf16_flags_reads_cpuinfo(tmp_path, cpuinfo, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_bf16_flags(path) == flags


def test_missing_cpuinfo_means_no_bf16(tmp_path):
    assert cpu_bf16_flags(tmp_path / "absent") == set()


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp(False, cpu, {"avx512_bf16"})[0] is False
    assert resolve_amp(True, cpu, {"avx512_bf16"}) == (
        True, "amp: bf16 autocast (hardware bf16 on this CPU: avx512_bf16)"
    )  # fmt: skip
    use, note = resolve_amp(True, cpu, set())
    assert use is False and "training in float32" in note
    assert resolve_amp(True, torch.device("cuda", 0), set())[0] is True


TINY = [
    "--model-arg", "dims=8,16", "--model-arg", "depths=1,1", "--model-arg", "heads=2,2",
    "--model-arg", "mlp_ratios=2,2", "--model-arg", "attention_kinds=X,V",
    "--model-arg", "layer_scale=false,false", "--model-arg", "head_hidden=16",
]  # fmt: skip


@pytest.mark.parametrize("hardware_bf16", [False, True])
def test_amp_on_the_cpu_follows_the_hardware(tmp_path: Path, capsys, monkeypatch, hardware_bf16):
    flags = {"avx512_bf16"} if hardware_bf16 else set()
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    autocast_used = []
    original = trainer.Trainer._autocast

    def spy(self):
        autocast_used.append(self.config.amp)
        return original(self)

    monkeypatch.setattr(trainer.Trainer, "_autocast", spy)
    argv = ["train", "--data", "digits", "--out", str(tmp_path), "--subset", "64", "--epochs", "1",
            "--batch-size", "32", "--amp", "--no-progress", "--threads", "1", *TINY]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert autocast_used and set(autocast_used) == {hardware_bf16}
    expected = "amp: bf16 autocast" if hardware_bf16 else "training in float32"
    assert expected in err
