"""apps.engine: atomic checkpoints, RNG round trips, schedule, batching, EMA, exact resume."""

from __future__ import annotations

import argparse
import math
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from apps.engine import (
    CheckpointError,
    MetricsLog,
    ModelEMA,
    Trainer,
    TrainerConfig,
    TrainingDiverged,
    WarmupSchedule,
    atomic_write,
    build_adamw,
    capture_rng_state,
    default_batch_size,
    load_training_state,
    load_weights,
    lr_factor,
    plan_epoch,
    restore_rng_state,
    save_training_state,
    save_weights,
    seed_everything,
    warmup_steps,
)
from apps.engine import trainer as trainer_module
from apps.engine.checkpoint import TRAINING_STATE_FORMAT
from apps.engine.distributed import ShardSampler
from apps.engine.model_args import with_stage_count


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    save_training_state({"format": TRAINING_STATE_FORMAT, "x": torch.arange(3)}, path)

    def torn_write(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, torn_write)
    state = load_training_state(path)
    assert torch.equal(state["x"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # temp file cleaned up


def test_atomic_write_never_replaces_before_data_is_complete(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_training_state({"format": TRAINING_STATE_FORMAT, "v": torch.tensor(1)}, path)

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save_training_state({"format": TRAINING_STATE_FORMAT, "v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(load_training_state(path)["v"]) == 1


def test_training_state_refuses_pickled_objects_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"  # like the authors' files: an argparse.Namespace inside
    torch.save({"format": TRAINING_STATE_FORMAT, "args": argparse.Namespace(lr=1)}, bad)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_training_state(bad)
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_training_state(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_state(tmp_path / "missing.pt")


def test_weights_round_trip_with_meta(tmp_path):
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    meta = {"model": "ppma_nano", "classes": ["x", "y"], "input_size": [28, 28]}
    save_weights(tensors, tmp_path / "w.safetensors", meta)
    got, got_meta = load_weights(tmp_path / "w.safetensors")
    assert got_meta == meta
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(tmp_path / "junk.safetensors")


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    seed_everything(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's generator
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))  # noqa: NPY002
    path = tmp_path / "s.pt"
    save_training_state({"format": TRAINING_STATE_FORMAT, "rng": state}, path)
    seed_everything(99)
    restore_rng_state(load_training_state(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))  # noqa: NPY002
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_lr_factor_warmup_cosine_and_poly():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(60, 110, 10, "poly", power=1.0) == pytest.approx(0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupSchedule(opt, total_steps=4, warmup_steps=2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="decay"):
        WarmupSchedule(opt, 4, decay="linear")


def test_warmup_steps_are_capped_to_a_share_of_the_run():
    assert warmup_steps(1, 5, 150, max_fraction=0.1) == 5  # one epoch fits in 10 %
    assert warmup_steps(1, 8, 16, max_fraction=0.1) == 1  # 2-epoch run: 10 % of 16 steps
    assert warmup_steps(5, 10, 20, max_fraction=0.5) == 10  # longer than the run: half of it
    assert warmup_steps(0.3, 10, 100) == 3  # fractional epochs
    assert warmup_steps(0, 10, 100) == 0
    # Capped, the schedule still reaches the end of its decay.
    steps = warmup_steps(5, 10, 20, max_fraction=0.5)
    assert lr_factor(steps - 1, 20, steps) == 1.0
    assert lr_factor(20, 20, steps, min_ratio=0.01) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        warmup_steps(-1, 10, 100)


@pytest.mark.parametrize(
    ("images", "expected"),
    [(144, 32), (230, 32), (54_000, 128), (1_000, 128), (40, 8), (8, 2), (5, 2), (2, 2), (1, 1)],
)
def test_default_batch_size_leaves_several_steps_per_epoch(images, expected):
    size = default_batch_size(images)
    assert size == expected
    assert size & (size - 1) == 0  # a power of two
    if images >= 8:
        assert images / size >= 4


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_plan_sees_every_image_and_never_a_batch_of_one(world_size):
    for n in range(1, 70):
        for batch_size in range(1, 20):
            plan = plan_epoch(n, batch_size, world_size)
            dataset = TensorDataset(torch.arange(n))
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=0, shuffle=False)
            loader = DataLoader(dataset, batch_size, sampler=sampler, drop_last=plan.drop_last)
            sizes = [len(batch[0]) for batch in loader]
            assert len(sizes) == plan.steps and len(sampler) == plan.images
            assert sum(sizes) == plan.images - plan.dropped
            assert plan.dropped == (1 if plan.images % batch_size == 1 < plan.images else 0)
            if batch_size > 1 and plan.images > 1:
                assert min(sizes) >= 2, (n, batch_size, sizes)


def test_fewer_dims_keep_the_models_first_per_stage_entries():
    from ppma_models.registry import get_config

    base = get_config("ppma_nano")  # four stages: heads 2,2,4,8, kinds XXVV
    got = with_stage_count(base, {"dims": (32, 64, 128), "depths": (1, 2, 1)})
    assert got == {
        "dims": (32, 64, 128), "depths": (1, 2, 1), "heads": (2, 2, 4), "mlp_ratios": (3, 3, 3),
        "attention_kinds": ("X", "X", "V"), "layer_scale": (False, False, False),
    }  # fmt: skip
    assert base.replace(**got).num_stages == 3
    assert with_stage_count(base, {"head_hidden": 8}) == {"head_hidden": 8}
    five = {"dims": (8, 16, 32, 64, 128)}  # more stages than the model: left to its check
    assert with_stage_count(base, five) == five


def test_ema_matches_closed_form():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.5)
    expected = 0.0
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        d = ema.current_decay()
        ema.update(model)
        expected = d * expected + (1 - d) * value
    assert ema.module.weight[0, 0].item() == pytest.approx(expected)
    assert ema.updates == 3


def test_weight_decay_groups_exempt_vectors_and_decay_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.register_parameter("A_log", torch.nn.Parameter(torch.zeros(2, 2)))
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    decayed, free = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert decayed["weight_decay"] == 0.1 and free["weight_decay"] == 0.0
    assert len(free["params"]) == 4


def test_lr_scales_give_prefixed_parameters_their_own_learning_rate():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1, lr_scales={"0.": 0.25})
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == 4  # every parameter in exactly one group
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == (2.5e-4 if name.startswith("0.") else 1e-3), name
        assert decay_of[id(p)] == (0.1 if p.ndim > 1 else 0.0), name
    assert opt.param_groups[0]["lr"] == 1e-3  # the logged lr is the unscaled one
    # A schedule scales every group alike.
    schedule = WarmupSchedule(opt, total_steps=10, warmup_steps=0, decay="poly")
    for _ in range(5):
        schedule.step()
    ratios = {g["lr"] / g["initial_lr"] for g in opt.param_groups}
    assert len(ratios) == 1 and 0 < ratios.pop() < 1
    with pytest.raises(ValueError, match="must be > 0"):
        build_adamw(model, lr=1e-3, lr_scales={"0.": 0.0})


def test_shard_sampler_partitions_without_padding():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(ShardSampler(10, r, 3)) for r in range(3)] == [4, 3, 3]


def test_metrics_log_keeps_latest_record_per_epoch(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.append({"epoch": 1, "loss": 2.0})
    log.append({"epoch": 2, "loss": float("nan")})
    log.append({"epoch": 1, "loss": 1.0})  # epoch 1 re-run after a crash
    with (tmp_path / "m.jsonl").open("a") as f:
        f.write('{"epoch": 3, "lo')  # torn line
    records = log.read()
    assert [(r["epoch"], r["loss"]) for r in records] == [(1, 1.0), (2, None)]


# ----------------------------------------------------------------------- Trainer


def _toy_run(out_dir, epochs, stop_after=None, resume=False, ema=True, **config_changes):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=4)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
    optimizer = build_adamw(model, lr=0.05)
    schedule = WarmupSchedule(optimizer, total_steps=epochs * len(loader), warmup_steps=2)

    def train_step(m, batch, device):
        xb, yb = batch
        logits = m(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        return loss, {
            "loss": loss.detach() * len(yb),
            "acc": (logits.argmax(1) == yb).sum(),
            "count": len(yb),
        }

    def evaluate(m, ctx):
        with torch.no_grad():
            acc = (m(x).argmax(1) == y).double().mean().item()
        return {"acc": acc}

    config = TrainerConfig(
        out_dir=out_dir,
        epochs=epochs,
        seed=7,
        grad_clip=1.0,
        ema_decay=0.9 if ema else None,
        progress=False,
        **config_changes,
    )
    trainer = Trainer(
        model,
        optimizer,
        schedule,
        loader,
        config,
        train_step=train_step,
        evaluate=evaluate,
        meta={"task": "toy"},
    )
    if resume:
        trainer.resume(out_dir / "last.pt")
    trainer.fit(stop_after_epochs=stop_after)
    return trainer


def test_resume_reproduces_uninterrupted_run_bitwise(tmp_path):
    straight = _toy_run(tmp_path / "a", epochs=3)
    _toy_run(tmp_path / "b", epochs=3, stop_after=1)
    # Disturb the global generators: resume must not depend on them.
    seed_everything(12345)
    resumed = _toy_run(tmp_path / "b", epochs=3, resume=True)
    assert resumed.step == straight.step == 12
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for a, b in zip(
        straight.ema.module.state_dict().values(),
        resumed.ema.module.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    records = MetricsLog(tmp_path / "b" / "metrics.jsonl").read()
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert (tmp_path / "b" / "curves.png").stat().st_size > 1000
    reference = MetricsLog(tmp_path / "a" / "metrics.jsonl").read()
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in reference]


def test_trainer_writes_best_and_last_files(tmp_path):
    trainer = _toy_run(tmp_path, epochs=2, ema=False)
    for name in ("last.pt", "best.pt", "last.safetensors", "best.safetensors", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    weights, meta = load_weights(tmp_path / "last.safetensors")
    assert meta["task"] == "toy" and meta["epoch"] == 2 and meta["ema"] is False
    assert torch.equal(weights["0.weight"], trainer.model.state_dict()["0.weight"])
    state = load_training_state(tmp_path / "best.pt")
    assert state["best_metric"] == max(
        r["val_acc"] for r in MetricsLog(tmp_path / "metrics.jsonl").read()
    )
    assert math.isfinite(state["best_metric"])


def test_epoch_records_label_the_lr_range_of_their_steps(tmp_path, capsys):
    _toy_run(tmp_path, epochs=2, ema=False)  # 4 steps per epoch, warm-up 2 steps, lr 0.05
    records = MetricsLog(tmp_path / "metrics.jsonl").read()
    for record, first in zip(records, (0, 4), strict=True):
        assert record["lr_start"] == pytest.approx(0.05 * lr_factor(first, 8, 2))
        assert record["lr_end"] == pytest.approx(0.05 * lr_factor(first + 3, 8, 2))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    assert "lr 2.50e-02 to " in lines[0] and lines[0].count("(warm-up)") == 1
    assert "(warm-up)" not in lines[1]


def test_curves_are_redrawn_by_time_and_after_the_last_epoch(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(trainer_module, "plot_curves", lambda records, *a: drawn.append(records))
    _toy_run(tmp_path / "hourly", epochs=4, ema=False, curves_every_s=3600.0)
    assert [len(records) for records in drawn] == [1, 4]  # first epoch, then the last one
    drawn.clear()
    _toy_run(tmp_path / "always", epochs=4, ema=False, curves_every_s=0.0)
    assert [len(records) for records in drawn] == [1, 2, 3, 4]


def test_last_checkpoint_is_written_by_time_and_after_the_last_epoch(tmp_path, monkeypatch):
    saved = []
    real = trainer_module.save_training_state

    def record_save(state, path):
        saved.append((path.name, state["epoch"]))
        real(state, path)

    monkeypatch.setattr(trainer_module, "save_training_state", record_save)
    _toy_run(tmp_path, epochs=4, ema=False, last_every_s=3600.0)
    last = [epoch for name, epoch in saved if name == "last.pt"]
    best = [epoch for name, epoch in saved if name == "best.pt"]
    assert last == [1, 4]  # the first epoch, then the last one
    records = MetricsLog(tmp_path / "metrics.jsonl").read()
    assert best == [r["epoch"] for r in records if r["is_best"]]
    assert load_training_state(tmp_path / "last.pt")["epoch"] == 4


def test_trainer_stops_with_clear_error_on_nan_loss(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = build_adamw(model, lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)

    def nan_step(m, batch, device):
        return m(batch[0]).sum() * float("nan"), {"count": 2}

    trainer = Trainer(
        model,
        optimizer,
        WarmupSchedule(optimizer, 2),
        loader,
        TrainerConfig(out_dir=tmp_path, epochs=1, progress=False),
        train_step=nan_step,
    )
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        trainer.fit()
    assert not (tmp_path / "last.pt").exists()
