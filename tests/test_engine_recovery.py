"""apps.engine.Trainer: a kill at any file write of a save loses nothing after resume.

Each test kills a tiny training run at one file operation (a metrics.jsonl append or the
rename that completes an atomic write), resumes it, and compares the run directory with
that of an uninterrupted run: same weights bit for bit, same metrics records (timings
aside), best.* and last.* the same, no temporary files left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from apps.engine import (
    MetricsLog,
    Trainer,
    TrainerConfig,
    WarmupSchedule,
    atomic_path,
    atomic_write,
    build_adamw,
    load_training_state,
    save_training_state,
)
from apps.engine import trainer as trainer_module
from apps.engine.checkpoint import TRAINING_STATE_FORMAT, new_file_mode

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"time", "epoch_seconds", "samples_per_second", "eval_seconds"}
# Validation scores by epoch: epochs 1, 2 and 4 improve, epoch 3 does not.
SCORES = [0.5, 0.7, 0.6, 0.8]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the trainer catches it."""


class KillSwitch:
    """Counts file operations; raises :class:`Killed` at operation number ``at``."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.ops: list[tuple[int, str]] = []  # (epoch being saved, file)
        self.epoch = 0

    def hit(self, name: str) -> bool:
        self.ops.append((self.epoch, name))
        return len(self.ops) - 1 == self.at


def _arm(monkeypatch: pytest.MonkeyPatch, switch: KillSwitch) -> None:
    """Route every atomic rename and metrics append through ``switch``."""
    real_replace, real_append = os.replace, MetricsLog.append

    def replace(src, dst):
        if switch.hit(Path(dst).name):
            # A real kill here leaves the finished temporary file behind.
            os.link(src, str(src)[: -len(".tmp")] + "-left.tmp")
            raise Killed
        real_replace(src, dst)

    def append(log: MetricsLog, record: dict[str, Any]) -> dict[str, Any]:
        switch.epoch = record["epoch"]
        if switch.hit(log.path.name):
            log.path.parent.mkdir(parents=True, exist_ok=True)
            with log.path.open("a", encoding="utf-8") as f:
                f.write(f'{{"epoch": {record["epoch"]}, "train_lo')  # torn mid-line
            raise Killed
        return real_append(log, record)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(MetricsLog, "append", append)


def _fake_curves(records: list[dict[str, Any]], path: Path, panels: Any) -> None:
    """A cheap stand-in for the PNG: still one atomic write per drawing."""
    atomic_write(path, lambda f: f.write(json.dumps(len(records)).encode()))


def _run(
    out_dir: Path,
    epochs: int,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    **config: Any,
) -> Trainer:
    """Train the toy classifier (EMA on, scripted validation scores)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=1, rank=0, seed=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, sampler=sampler)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
    optimizer = build_adamw(model, lr=0.05)
    schedule = WarmupSchedule(optimizer, total_steps=epochs * len(loader), warmup_steps=2)
    holder: list[Trainer] = []

    def train_step(m, batch, device):
        logits = m(batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        return loss, {"loss": loss.detach() * len(batch[1]), "count": len(batch[1])}

    def evaluate(m, ctx):
        return {"acc": SCORES[holder[0].epoch - 1]}

    settings = {"seed": 7, "ema_decay": 0.9, "progress": False, "curves_every_s": 0.0, **config}
    trainer_config = TrainerConfig(out_dir=out_dir, epochs=epochs, **settings)
    trainer = Trainer(
        model, optimizer, schedule, loader, trainer_config,
        train_step=train_step, evaluate=evaluate, meta={"task": "toy"},
    )  # fmt: skip
    holder.append(trainer)
    if resume:
        trainer.resume(out_dir / "last.pt")
    trainer.fit(stop_after_epochs=stop_after)
    return trainer


def _same(a: Any, b: Any, where: str) -> None:
    """Recursive equality: tensors bit for bit, metrics records without their timings."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        # equal_nan: the RNG state stores "no cached gaussian" as NaN.
        assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), where
    elif isinstance(a, Mapping):
        keys = set(a) - TIMING_KEYS
        assert keys == set(b) - TIMING_KEYS, where
        for key in keys:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_run(run: Path, reference: Path) -> None:
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in ("last.pt", "best.pt"):
        _same(load_training_state(run / name), load_training_state(reference / name), name)
    for name in ("last.safetensors", "best.safetensors"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    _same(lines, expected, "metrics.jsonl")  # raw lines: no duplicate or torn record either
    assert (run / "curves.png").read_text() == (reference / "curves.png").read_text()
    for path in run.iterdir():
        assert path.stat().st_mode & 0o777 == new_file_mode(), path.name


def _kill_and_resume(monkeypatch, tmp_path: Path, epochs: int, **config: Any) -> int:
    """Kill a run at every file operation of every save; each resumed run must equal the
    uninterrupted one. Returns how many kill points were tried."""
    monkeypatch.setattr(trainer_module, "plot_curves", _fake_curves)
    with monkeypatch.context() as patch:
        probe = KillSwitch()
        _arm(patch, probe)
        _run(tmp_path / "reference", epochs, **config)
    for at, (_, name) in enumerate(probe.ops):
        run = tmp_path / f"killed-{at}"
        with monkeypatch.context() as patch:
            _arm(patch, KillSwitch(at))
            with pytest.raises(Killed):
                _run(run, epochs, **config)
        assert any(p.name.endswith("-left.tmp") for p in run.iterdir()) or name.endswith("jsonl")
        # Killed before any training state existed: the only way on is to start over.
        started = (run / "last.pt").exists() or (run / "best.pt").exists()
        _run(run, epochs, resume=started, **config)
        _assert_same_run(run, tmp_path / "reference")
    return len(probe.ops)


def test_kill_at_any_write_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    # Every epoch writes the record, best.* when it improves, last.* and the curves.
    assert _kill_and_resume(monkeypatch, tmp_path, epochs=4) == 4 * 4 + 3 * 2


def test_kill_with_last_written_by_time_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    # last.* only after the first and the last epoch: epoch 2 and 3 are committed by best.pt
    # or not at all, and epoch 3's record must go when the run resumes from epoch 2.
    assert (
        _kill_and_resume(monkeypatch, tmp_path, epochs=4, last_every_s=3600.0)
        == 4 * 2 + 3 * 2 + 2 * 2
    )


def test_resume_after_a_kill_in_the_final_save_repairs_best(tmp_path, monkeypatch):
    """The case that used to be permanent: last.pt of the final epoch written, best.* and
    the epoch's record not (the order of earlier versions)."""
    monkeypatch.setattr(trainer_module, "plot_curves", _fake_curves)
    _run(tmp_path / "reference", epochs=4)
    run = tmp_path / "run"
    _run(run, epochs=4, stop_after=2)
    old_best = {name: (run / name).read_bytes() for name in ("best.pt", "best.safetensors")}
    _run(run, epochs=4, resume=True)
    for name, data in old_best.items():  # best.* as they were before epoch 4's save
        (run / name).write_bytes(data)
    records = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(records[:3]) + "\n")  # epoch 4's is lost
    trainer = _run(run, epochs=4, resume=True)
    assert trainer.epoch == 4
    _assert_same_run(run, tmp_path / "reference")


def test_real_kill_leaves_temp_files_that_resume_removes(tmp_path, monkeypatch):
    """os._exit in a child process halfway through the final save (before last.pt's rename)."""
    monkeypatch.setattr(trainer_module, "plot_curves", _fake_curves)
    _run(tmp_path / "reference", epochs=3)
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]
        import test_engine_recovery as t
        from apps.engine import trainer as trainer_module
        trainer_module.plot_curves = t._fake_curves
        real_replace = os.replace
        def replace(src, dst):
            log = t.MetricsLog({str(run / "metrics.jsonl")!r}).read()
            if str(dst).endswith("last.pt") and len(log) == 3:
                os._exit(9)
            real_replace(src, dst)
        os.replace = replace
        t._run(__import__("pathlib").Path({str(run)!r}), epochs=3)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=300, check=False)
    assert done.returncode == 9
    leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(name.startswith(".last.pt.") for name in leftovers)
    assert load_training_state(run / "last.pt")["epoch"] == 2
    trainer = _run(run, epochs=3, resume=True)  # the final epoch's save is finished
    assert trainer.epoch == 3
    _assert_same_run(run, tmp_path / "reference")


def test_a_fresh_run_clears_an_old_run_and_its_temp_files(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "plot_curves", _fake_curves)
    run = tmp_path / "run"
    _run(run, epochs=4)
    (run / ".best.pt.x1y2z3.tmp").write_bytes(b"\0" * 100)
    # A new run killed before its first save must not resume from the old run's files.
    with monkeypatch.context() as patch:
        _arm(patch, KillSwitch(at=0))
        with pytest.raises(Killed):
            _run(run, epochs=4)
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl"]
    assert MetricsLog(run / "metrics.jsonl").read() == []


def test_checkpoint_files_get_the_mode_of_ordinary_new_files(tmp_path):
    old = os.umask(0o027)
    try:
        save_training_state({"format": TRAINING_STATE_FORMAT}, tmp_path / "a.pt")
        with atomic_path(tmp_path / "b.safetensors") as tmp:
            tmp.write_bytes(b"x")
        (tmp_path / "c.txt").write_text("x")
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert modes == {"a.pt": 0o640, "b.safetensors": 0o640, "c.txt": 0o640}
