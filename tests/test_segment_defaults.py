"""Training defaults sized for the data: rules, report, and a default run against a tuned one.

The end-to-end comparison trains on a small two-class folder -- 12 training and 4 validation
tiles of 64x64 pixels, bright blobs on a textured background -- once with the defaults and once
with hand-picked crop, batch size, epochs and warmup, and checks that the defaults land within
5 points of mIoU of the tuned run. The tiles are 64x64 rather than 128x128 and the model is
small (three one-block stages, 16 head channels) so both runs together take about a minute.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apps.engine import lr_factor
from apps.segment.cli import main
from apps.segment.model import load_meta
from apps.segment.settings import (
    DEFAULT_CROP,
    DEFAULT_EPOCHS,
    DEFAULT_WARMUP,
    MIN_AUTO_STEPS,
    choose_batch_size,
    choose_crop,
    choose_epochs,
    choose_warmup,
)

SMALL_MODEL = [
    "--channels", "16", "--aux-channels", "8",
    "--model-arg", "dims=16,32,64", "--model-arg", "depths=1,1,1",
    "--model-arg", "heads=2,2,4", "--model-arg", "mlp_ratios=2,2,2",
    "--model-arg", "attention_kinds=X,X,V", "--model-arg", "layer_scale=false,false,false",
    "--no-progress",
]  # fmt: skip
TUNED = ["--crop", "64", "--batch-size", "4", "--epochs", "40", "--warmup-steps", "12"]


def blob_tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB tile of bright elliptic blobs (class 1) on a striped, noisy background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = 90 + rng.normal(0, 12, (size, size))
    for _ in range(4):  # texture that a brightness threshold alone gets partly wrong
        fx, fy = rng.uniform(0.05, 0.4, 2)
        background += rng.uniform(10, 25) * np.sin(fx * xx + fy * yy + rng.uniform(0, 6.3))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(size / 16, size / 6, 2)
        mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    grey = np.where(mask == 1, background + 70, background)
    rgb = np.stack([grey, grey * 0.9 + 10, grey * 0.8 + 20], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def write_tiles(folder: Path, count: int, size: int, seed: int) -> None:
    """``count`` tiles as folder/images/tNN.png + folder/masks/tNN.png."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(count):
        image, mask = blob_tile(rng, size)
        Image.fromarray(image).save(folder / "images" / f"t{i:02d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"t{i:02d}.png")


def blob_root(root: Path, size: int = 64, train: int = 12, val: int = 4) -> Path:
    """root/train + root/val + root/classes.txt, the layout with a separate validation split."""
    write_tiles(root / "train", train, size, seed=0)
    write_tiles(root / "val", val, size, seed=1)
    (root / "classes.txt").write_text("background\nblob\n")
    return root


def _train(data: Path, out: Path, *extra: str) -> tuple[str, float]:
    """Train in this process; returns what it printed on stderr and the wall time."""
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--data", str(data), "--out", str(out), *SMALL_MODEL, *extra])
    assert code == 0, err.getvalue()[-2000:]
    return err.getvalue(), time.perf_counter() - start


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def blob_runs(tmp_path_factory) -> dict:
    """The blob folder, trained once with the defaults and once with tuned settings."""
    base = tmp_path_factory.mktemp("blobs")
    data = blob_root(base / "data")
    default_log, default_seconds = _train(data, base / "default")
    tuned_log, tuned_seconds = _train(data, base / "tuned", *TUNED)
    return {
        "data": data,
        "default": base / "default",
        "tuned": base / "tuned",
        "default_log": default_log,
        "times": (default_seconds, tuned_seconds),
    }


# ---------------------------------------------------------------- the rules


def test_crop_follows_small_images_and_explicit_crop_wins():
    assert choose_crop(None, [(128, 128)] * 12).value == 128
    assert "128x128" in choose_crop(None, [(128, 128)] * 12).source
    assert choose_crop(None, [(600, 300), (500, 200), (900, 400)]).value == 300  # median side
    assert choose_crop(None, [(1024, 768)] * 3).value == DEFAULT_CROP
    assert choose_crop(None, None, canvas=64).value == 64
    explicit = choose_crop(96, [(128, 128)])
    assert (explicit.value, explicit.source) == (96, "--crop")


@pytest.mark.parametrize(
    ("images", "batch"), [(2, 2), (7, 2), (12, 3), (40, 10), (64, 16), (8000, 16)]
)
def test_auto_batch_leaves_several_steps_per_epoch(images, batch):
    choice = choose_batch_size(None, images)
    assert choice.value == batch and choice.source.startswith("auto")
    assert images // choice.value >= min(4, images // 2)


def test_batch_size_errors_name_the_option():
    with pytest.raises(SystemExit, match=r"--batch-size 16 is larger .* 12 training images"):
        choose_batch_size(16, 12)
    with pytest.raises(SystemExit, match="at least 2"):
        choose_batch_size(None, 1)
    assert choose_batch_size(12, 12).value == 12


def test_epochs_grow_on_small_data_only():
    assert choose_epochs(None, 500).value == DEFAULT_EPOCHS
    small = choose_epochs(None, 4)
    assert small.value == math.ceil(MIN_AUTO_STEPS / 4) and "300" in small.source
    assert choose_epochs(5, 4).value == 5


@pytest.mark.parametrize("total", [1, 2, 3, 10, 36, 300, 1999, 2000, 50_000])
def test_auto_warmup_is_a_fraction_of_the_run_and_the_lr_decays(total):
    warmup = choose_warmup(None, total).value
    assert warmup <= DEFAULT_WARMUP and warmup <= total // 10
    # After warmup the schedule decays: the last step's lr is below the peak.
    last = lr_factor(total - 1, total, warmup, decay="poly")
    assert last < 1.0 or total == 1


def test_explicit_warmup_wins_but_must_be_shorter_than_the_run():
    assert choose_warmup(15, 180).value == 15
    with pytest.raises(SystemExit, match=r"--warmup-steps 200 is not shorter than .* 36"):
        choose_warmup(200, 36)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_default_settings_reach_the_tuned_run(blob_runs):
    default = json.loads((blob_runs["default"] / "summary.json").read_text())
    tuned = json.loads((blob_runs["tuned"] / "summary.json").read_text())
    seconds = blob_runs["times"]
    print(
        f"defaults: val mIoU {100 * default['val_miou']:.2f}% (best "
        f"{100 * default['best_val_miou']:.2f}%) in {seconds[0]:.0f}s; tuned: "
        f"{100 * tuned['val_miou']:.2f}% (best {100 * tuned['best_val_miou']:.2f}%) in "
        f"{seconds[1]:.0f}s"
    )
    assert tuned["val_miou"] > 0.75  # the tuned run learned the blobs
    assert default["val_miou"] >= tuned["val_miou"] - 0.05
    assert default["best_val_miou"] >= tuned["best_val_miou"] - 0.05


def test_settings_are_printed_before_training(blob_runs):
    log = blob_runs["default_log"]
    settings, first_epoch = log.index("settings:"), log.index("epoch 1/")
    assert settings < first_epoch
    report = log[settings:first_epoch]
    for expected in (
        "12 train / 4 val",
        "2: background, blob",
        "crop          64 (auto: the training images (64x64) are smaller than 512)",
        "batch size    3 per process (auto",
        "steps         4 per epoch, 300 in all",
        "epochs        75 (auto",
        "warmup steps  30 (auto: the default 200 capped at 10% of 300 steps)",
        "schedule",
        "device        cpu",
        "threads",
    ):
        assert expected in report, expected
    records = _records(blob_runs["default"])
    assert len(records) == 75 and records[-1]["step"] == 300


def test_validation_split_is_called_val(blob_runs):
    keys = set().union(*(r.keys() for r in _records(blob_runs["default"])))
    assert {"val_miou", "val_pixel_acc", "val_loss"} <= keys
    assert not any("test" in key for key in keys)
    assert "val mIoU" in blob_runs["default_log"]


def test_eval_without_data_scores_the_recorded_validation_images(blob_runs, tmp_path):
    run = blob_runs["default"]
    meta = load_meta(run)["data"]
    assert meta["val"] == {"root": str((blob_runs["data"] / "val").resolve())}
    assert main(["eval", str(run), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    best = json.loads((run / "summary.json").read_text())["best_val_miou"]
    assert report["miou"] == pytest.approx(best, abs=1e-9) and report["images"] == 4
    # --data ROOT with train/ + val/ scores val/: the same images, the same number.
    args = ["eval", str(run), "--data", str(blob_runs["data"]), "--out", str(tmp_path / "b")]
    assert main([*args, "--no-progress"]) == 0
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["miou"] == report["miou"]


def test_eval_of_a_folder_run_refuses_scene_options(blob_runs, capsys):
    assert main(["eval", str(blob_runs["default"]), "--canvas", "48"]) == 2
    assert "--canvas applies to --data scenes" in capsys.readouterr().err
    assert main(["eval", str(blob_runs["default"]), "--data", "scenes"]) == 2
    err = capsys.readouterr().err
    assert "--data scenes: the model predicts 2 classes" in err and len(err.splitlines()) == 1
