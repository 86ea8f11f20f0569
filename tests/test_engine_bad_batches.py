"""apps.engine.Trainer: unreadable files never stop training.

The classifier's folder data set yields ``None`` for a file it cannot decode and its collate
function drops it, so a batch can shrink -- to nothing, or to one image, which BatchNorm
cannot train on. Such batches are skipped with a warning that names the lost files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from apps.classify.datasets import FolderDataset, collate_skipping_failed, scan_image_folder
from apps.engine import Trainer, TrainerConfig, WarmupSchedule, build_adamw
from apps.engine.batching import batch_length, planned_batch_size, unreadable_in_batch

ROOT = Path(__file__).resolve().parents[1]


def _pythonpath() -> str:
    """The checkout first, then the path this test runs with: a subprocess imports the apps
    from here and the same ppma_models and ppma_ops as the test."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _image_folder(root: Path) -> list[tuple[str, int]]:
    """Two classes of eight 8x8 grey PNGs each."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    samples, _ = scan_image_folder(root)
    return samples


def _corrupt(paths: list[str]) -> None:
    for path in paths:
        Path(path).write_bytes(b"not an image at all")


def _loader(samples: list[tuple[str, int]], batch_size: int = 4) -> DataLoader:
    dataset = FolderDataset(samples, channels=1, transform=lambda image: image.float() / 255)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
    return DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate_skipping_failed)


def _fit(loader: DataLoader, out_dir: Path, epochs: int = 2) -> Trainer:
    torch.manual_seed(0)
    # BatchNorm after pooling sees one value per channel and image: a batch of one fails.
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
        torch.nn.Linear(8, 2),
    )  # fmt: skip
    optimizer = build_adamw(model, lr=0.01)

    def train_step(m, batch, device):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(m(x), y)
        return loss, {"loss": loss.detach() * len(y), "count": len(y)}

    trainer = Trainer(
        model, optimizer, WarmupSchedule(optimizer, epochs * len(loader)), loader,
        TrainerConfig(out_dir=out_dir, epochs=epochs, progress=False, best_metric="train_loss",
                      best_mode="min"),
        train_step=train_step,
    )  # fmt: skip
    trainer.fit()
    return trainer


def test_batches_shrunk_by_unreadable_files_are_skipped_and_the_files_named(tmp_path, capsys):
    samples = _image_folder(tmp_path / "data")
    paths = [path for path, _ in samples]
    # Batches of four in file order: the second keeps one image, the fourth none.
    shrunk, emptied = paths[4:7], paths[12:16]
    _corrupt(shrunk + emptied)
    trainer = _fit(_loader(samples), tmp_path / "run", epochs=2)
    assert trainer.step == 2 * 2  # two of the four batches trained, in each epoch
    assert (tmp_path / "run" / "last.pt").is_file()
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if "skipped the training step" in line
    ]
    assert len(warnings) == 2 * 2
    assert "epoch 1, batch 2: 1 sample of 4 loaded" in warnings[0]
    assert all(path in warnings[0] for path in shrunk) and paths[7] not in warnings[0]
    assert "epoch 1, batch 4: no sample loaded" in warnings[1]
    assert all(path in warnings[1] for path in emptied)


def test_unreadable_in_batch_replays_only_an_epoch_fixed_order(tmp_path):
    samples = _image_folder(tmp_path / "data")
    _corrupt([samples[9][0]])
    loader = _loader(samples)
    loader.sampler.set_epoch(3)
    assert unreadable_in_batch(loader, 2) == [samples[9][0]]
    assert unreadable_in_batch(loader, 0) == []
    assert unreadable_in_batch(loader, 9) is None  # no such batch
    shuffled = DataLoader(loader.dataset, 4, shuffle=True, collate_fn=collate_skipping_failed)
    assert unreadable_in_batch(shuffled, 2) is None  # a new order each pass: cannot replay
    state = torch.get_rng_state()
    unreadable_in_batch(loader, 2)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_planned_batch_of_one_is_trained(tmp_path):
    """Only a batch that shrank is skipped; a loader built with batch size 1 trains as is."""
    samples = _image_folder(tmp_path / "data")[:4]
    loader = _loader(samples, batch_size=1)
    assert planned_batch_size(loader) == 1
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _fit(loader, tmp_path / "run", epochs=1)  # BatchNorm's own limit, not a skip


def test_batch_length_finds_the_first_batched_tensor():
    images = torch.zeros(3, 1, 8, 8)
    assert batch_length((images, torch.zeros(3))) == 3
    assert batch_length({"meta": "x", "scale": torch.tensor(1.0), "image": images}) == 3
    assert batch_length([["name"], [images]]) == 3
    assert batch_length("text") is None and batch_length(torch.tensor(2.0)) is None


_DDP_SCRIPT = """
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from apps.classify.datasets import FolderDataset, collate_skipping_failed, scan_image_folder
from apps.engine import Trainer, TrainerConfig, WarmupSchedule, build_adamw, init_distributed

ctx = init_distributed("cpu")
samples, _ = scan_image_folder(sys.argv[1])
dataset = FolderDataset(samples, channels=1, transform=lambda image: image.float() / 255)
sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=False)
loader = DataLoader(dataset, 4, sampler=sampler, collate_fn=collate_skipping_failed)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
)
optimizer = build_adamw(model, lr=0.01)


def train_step(m, batch, device):
    loss = torch.nn.functional.cross_entropy(m(batch[0]), batch[1])
    return loss, {"loss": loss.detach() * len(batch[1]), "count": len(batch[1])}


config = TrainerConfig(out_dir=Path(sys.argv[2]), epochs=2, progress=False)
trainer = Trainer(
    model, optimizer, WarmupSchedule(optimizer, 4), loader, config, train_step=train_step, ctx=ctx
)
trainer.fit()
print(f"rank {ctx.rank} steps {trainer.step}")
ctx.shutdown()
"""


def test_under_torchrun_one_ranks_damaged_batch_skips_the_step_everywhere(tmp_path):
    samples = _image_folder(tmp_path / "data")
    # Unshuffled, rank 1 reads images 1, 3, 5, 7, ...: its first batch keeps only image 7.
    _corrupt([samples[i][0] for i in (1, 3, 5)])
    script = tmp_path / "train.py"
    script.write_text(_DDP_SCRIPT)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), str(tmp_path / "data"), str(tmp_path / "run"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The two processes share stdout, so their lines can interleave: find them, not split.
    assert sorted(re.findall(r"rank \d+ steps \d+", proc.stdout)) == [
        "rank 0 steps 2", "rank 1 steps 2"
    ]  # fmt: skip
    warnings = [line for line in proc.stderr.splitlines() if "skipped the training step" in line]
    assert len(warnings) == 2  # once per epoch, by the process that lost the files
    assert "batch 1 (process 1; skipped on every process): 1 sample of 4" in warnings[0]
    assert all(samples[i][0] in warnings[0] for i in (1, 3, 5))
