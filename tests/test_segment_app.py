"""The segment app end to end on tiny data: train, eval, predict, resume, torchrun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from apps.engine.checkpoint import load_training_state
from apps.segment.cli import main
from apps.segment.model import load_trained
from apps.segment.transforms import to_tensors

ROOT = Path(__file__).resolve().parents[1]


def _pythonpath() -> str:
    """The checkout first, then the path this test runs with: a subprocess imports the apps
    from here and the same ppma_models and ppma_ops as the test."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


# A tiny model on tiny scenes: each run is a few optimizer steps.
TINY = [
    "--channels", "16", "--aux-channels", "8", "--batch-size", "4", "--warmup-steps", "0",
    "--no-progress", "--lr", "1e-3",
]  # fmt: skip
SCENES = [
    "--data", "scenes", "--canvas", "32", "--crop", "32", "--min-size", "12", "--max-size", "20",
    "--train-scenes", "8", "--val-scenes", "6",
]  # fmt: skip


def _train(out: Path, *extra: str) -> None:
    assert main(["train", *SCENES, *TINY, "--out", str(out), *extra]) == 0


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("seg") / "run"
    _train(run, "--epochs", "2")
    return run


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_train_writes_checkpoints_metrics_and_curves(trained_run):
    for name in ("last.pt", "best.pt", "last.safetensors", "best.safetensors", "curves.png"):
        assert (trained_run / name).is_file(), name
    records = _records(trained_run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0.0 <= r["val_miou"] <= 1.0 and np.isfinite(r["train_loss"]) for r in records)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["val_miou"] == records[-1]["val_miou"]


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_eval_reproduces_the_training_evaluation(trained_run, tmp_path, capsys):
    assert main(["eval", str(trained_run / "last.safetensors"), "--val-scenes", "6",
                 "--out", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "eval.json").read_text())
    # Same held-out scenes (layout read from the checkpoint), same weights: same numbers.
    assert report["miou"] == pytest.approx(_records(trained_run)[-1]["val_miou"], abs=1e-9)
    assert len(report["per_class_iou"]) == 11 and (tmp_path / "confusion.png").is_file()
    out = capsys.readouterr().out
    assert "mIoU" in out and "Sneaker" in out


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_eval_with_test_time_augmentation_is_recorded_and_differs_from_plain(trained_run, tmp_path):
    assert main(["eval", str(trained_run), "--val-scenes", "6", "--flip", "--scales", "0.75", "1",
                 "--out", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["flip"] is True and report["scales"] == [0.75, 1.0]
    assert 0.0 <= report["miou"] <= 1.0
    assert report["loss"] != pytest.approx(_records(trained_run)[-1]["val_loss"], abs=1e-9)


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_eval_sliding_window_on_larger_scenes(trained_run, tmp_path):
    assert main(["eval", str(trained_run), "--canvas", "48", "--val-scenes", "2", "--mode",
                 "slide", "--out", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["window"] == 32 and report["stride"] == 21
    assert report["data"]["canvas"] == 48


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_predict_writes_masks_equal_to_the_model_argmax(trained_run, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 28), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", str(trained_run), str(images), "--out", str(out)]) == 0
    model, spec = load_trained(trained_run)
    for i in range(2):
        with Image.open(out / f"{i}_mask.png") as m:
            assert m.mode == "P"
            mask = np.asarray(m)
        grey = np.asarray(Image.open(images / f"{i}.png").convert("RGB"))
        with torch.no_grad():
            expected = model(to_tensors(grey)[None]).argmax(1)[0].numpy()
        np.testing.assert_array_equal(mask, expected)
        assert Image.open(out / f"{i}_overlay.png").size == (28, 40)
    legend = json.loads((out / "legend.json").read_text())
    assert legend[0]["name"] == "background" and len(legend) == spec.num_classes


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_resume_continues_exactly(trained_run, tmp_path):
    straight, split = trained_run, tmp_path / "split"  # straight: the same 2 epochs, in one go
    _train(split, "--epochs", "2", "--stop-after-epochs", "1")
    assert len(_records(split)) == 1
    _train(split, "--epochs", "2", "--resume", "auto")
    a = load_file(straight / "last.safetensors")
    b = load_file(split / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _records(split)[-1]["val_miou"] == _records(straight)[-1]["val_miou"]


def _folder(root: Path, count: int, size=(40, 36)) -> Path:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        mask = np.kron(rng.integers(0, 3, (size[0] // 4, size[1] // 4)), np.ones((4, 4)))
        mask[:2] = 255  # an unlabelled strip
        image = (mask[..., None] * 60 + rng.integers(0, 40, (*size, 3))).clip(0, 255)
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"im{i}.jpg")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"im{i}.png")
    (root / "classes.txt").write_text("ground\nwall\nlamp\n")
    return root


def test_folder_training_and_sliding_evaluation(tmp_path):
    data = _folder(tmp_path / "data", 10)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--crop", "32",
                 "--epochs", "1", "--val-fraction", "0.2", "--eval-mode", "slide",
                 *TINY]) == 0  # fmt: skip
    record = _records(run)[-1]
    assert 0.0 <= record["val_miou"] <= 1.0
    model, spec = load_trained(run / "best.safetensors")
    assert spec.class_names == ("ground", "wall", "lamp") and spec.crop == 32
    assert main(["eval", str(run), "--data", str(data), "--mode", "slide",
                 "--no-progress"]) == 0  # fmt: skip
    # Without --data, eval scores the images the run held out: the training's own number.
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--mode", "slide", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 2
    assert report["miou"] == pytest.approx(record["val_miou"], abs=1e-9)


def test_train_and_val_folders_under_one_root(tmp_path, capsys):
    root = tmp_path / "data"
    _folder(root / "train", 8)
    _folder(root / "val", 3)
    for split in ("train", "val"):
        (root / split / "classes.txt").unlink()
    (root / "classes.txt").write_text("floor\nwall\nlight\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), "--epochs", "1",
                 *TINY]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "8 train / 3 val" in err and "3: floor, wall, light" in err
    assert "crop          36 (auto: the training images (36x40) are smaller than 512)" in err
    assert load_trained(run)[1].class_names == ("floor", "wall", "light")
    assert _records(run)[-1]["val_miou"] >= 0.0
    assert main(["eval", str(run), "--no-progress"]) == 0
    assert "floor" in capsys.readouterr().out
    # An explicit --val-fraction cannot apply: the root has its validation folder.
    assert main(["train", "--data", str(root), "--out", str(run), "--val-fraction", "0.2",
                 *TINY]) == 2  # fmt: skip
    assert "--val-fraction 0.2 applies only without a validation folder" in capsys.readouterr().err
    # A root without val/ cannot be scored as a whole: that would score the training images.
    (root / "val").rename(tmp_path / "elsewhere")
    assert main(["eval", str(run), "--data", str(root)]) == 2
    assert f"--data {root} has train/ but no val/" in capsys.readouterr().err


def test_options_of_the_other_kind_of_data_are_refused(tmp_path, capsys):
    data = _folder(tmp_path / "data", 4)
    for argv, message in (
        (["--data", "scenes", "--val-data", str(data)], "--val-data applies to folder data"),
        (["--data", str(data), "--canvas", "32"], "--canvas applies to --data scenes"),
        (["--data", str(data), "--train-scenes", "9"], "--train-scenes applies to --data scenes"),
    ):
        with pytest.raises(SystemExit):
            main(["train", *argv, "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_bad_folder_is_reported_with_every_problem(tmp_path, capsys):
    data = _folder(tmp_path / "data", 3)
    (data / "masks" / "im0.png").unlink()
    (data / "images" / "im1.jpg").write_bytes(b"garbage")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "r"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 problem(s)" in err and "im0.jpg: no mask" in err and "im1.jpg: cannot decode" in err


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_bad_arguments_and_files_give_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *SCENES, "--out", str(tmp_path), "--batch-size", "0"])
    assert info.value.code == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", *SCENES, "--out", str(tmp_path), "--batch-size", "1"])
    assert "needs more than one value per channel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", *SCENES, "--out", str(tmp_path), "--head-dropout", "1"])
    assert "--head-dropout must be in [0, 1)" in capsys.readouterr().err

    assert main(["eval", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    assert main(["eval", str(foreign)]) == 2
    assert "not written by the segment app" in capsys.readouterr().err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"nope")
    assert main(["eval", str(garbage)]) == 2
    assert "cannot read training checkpoint" in capsys.readouterr().err

    assert main(["train", *SCENES, "--out", str(tmp_path), "--batch-size", "64"]) == 2
    assert "larger than this process's share" in capsys.readouterr().err
    # 8 scenes in batches of 4 for 2 epochs are 4 steps: a warmup of 4 would never decay.
    assert main(["train", *SCENES, *TINY, "--out", str(tmp_path), "--epochs", "2",
                 "--warmup-steps", "4"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--warmup-steps 4 is not shorter than the run's 4 optimizer steps" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_torchrun_two_processes_match_a_single_process_evaluation(tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    # `python -m torch.distributed.run` is torchrun, with this interpreter and its packages.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "apps.segment", "train", *SCENES, *TINY, "--out", str(run),
           "--epochs", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = _records(run)[-1]
    assert record["train_count"] == 8  # two ranks x one batch of 4: the counts were summed
    # The ranks evaluated disjoint shards (3 images each, one batch); summed confusion matrices
    # must give the single-process score of the same weights. Same batch shape and one thread
    # as on the ranks, so every image's logits are computed identically.
    threads = torch.get_num_threads()
    try:
        args = ["eval", str(run / "last.safetensors"), "--val-scenes", "6", "--batch-size", "3",
                "--threads", "1", "--out", str(tmp_path / "ev"), "--no-progress"]  # fmt: skip
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["miou"] == pytest.approx(record["val_miou"], abs=1e-9)


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_bf16_autocast_training(tmp_path):
    run = tmp_path / "amp"
    _train(run, "--epochs", "1", "--amp", "--attention", "reference")
    record = _records(run)[-1]
    assert np.isfinite(record["train_loss"]) and 0.0 <= record["val_miou"] <= 1.0
    weights = load_file(run / "last.safetensors")
    assert all(t.dtype != torch.bfloat16 for t in weights.values())  # autocast, not bf16 weights


THREE_STAGES = [
    "--model-arg", "dims=16,32,64", "--model-arg", "depths=1,1,1", "--model-arg", "heads=2,2,4",
    "--model-arg", "mlp_ratios=2,2,2", "--model-arg", "attention_kinds=X,X,V",
    "--model-arg", "layer_scale=false,false,false",
]  # fmt: skip


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_model_args_shape_the_backbone_and_travel_with_the_checkpoint(tmp_path):
    run = tmp_path / "three"
    head = ["--head-dropout", "0.25", "--fuse-kernel", "1"]
    _train(run, "--epochs", "1", *THREE_STAGES, *head)
    model, spec = load_trained(run)
    assert spec.backbone_args["dims"] == (16, 32, 64) and spec.num_stages == 3
    assert spec.dropout == 0.25 and spec.fuse_kernel == 1
    assert model.decode_head.dropout.p == model.auxiliary_head.dropout.p == 0.25
    assert model.decode_head.fpn_bottleneck.conv.kernel_size == (1, 1)
    # UPerNet fuses the three stages; the auxiliary head sits on the penultimate one.
    assert len(model.decode_head.lateral_convs) + 1 == 3
    assert model.auxiliary_head.in_index == 1
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 11, 32, 32)


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_bad_model_arg_stops_before_training(tmp_path, capsys):
    run = tmp_path / "bad"
    for bad, message in (("no_such_field=3", "unknown PPMAConfig field"), ("dims", "KEY=VALUE")):
        args = ["train", *SCENES, *TINY, "--out", str(run), "--epochs", "1", "--model-arg", bad]
        assert main(args) == 2
        captured = capsys.readouterr()
        assert "--model-arg" in captured.err + captured.out
        assert message in captured.err + captured.out
    assert not (run / "last.pt").exists()


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_greyscale_classifier_weights_initialise_the_backbone(tmp_path):
    # The segment_demo recipe pretrains its backbone with apps.classify on Fashion-MNIST (one
    # input channel) and trains on RGB scenes: the loader spreads the stem over three channels.
    from ppma_models import create_model, save_safetensors

    from apps.engine.model_args import parse_model_args
    from apps.segment.model import ModelSpec, build_model

    overrides = parse_model_args(THREE_STAGES[1::2])
    torch.manual_seed(0)
    classifier = create_model("ppma_nano", num_classes=10, in_chans=1, **overrides)
    path = tmp_path / "fashion.safetensors"
    save_safetensors(classifier, path)
    spec = ModelSpec("ppma_nano", 11, tuple("abcdefghijk"), 16, 8, backbone_args=overrides)
    model = build_model(spec, pretrained=str(path))
    stem = classifier.stem.conv1.weight.detach()
    torch.testing.assert_close(model.backbone.stem.conv1.weight, stem.expand(-1, 3, -1, -1) / 3)
    torch.testing.assert_close(model.backbone.stages[2].blocks[0].ffn.fc1.weight,
                               classifier.stages[2].blocks[0].ffn.fc1.weight)  # fmt: skip
    _train(tmp_path / "run", "--epochs", "1", *THREE_STAGES, "--pretrained", str(path),
           "--lr", "1e-3", "--backbone-lr-scale", "0.1")  # fmt: skip
    assert (tmp_path / "run" / "best.safetensors").is_file()
    # The pretrained backbone is fine-tuned at a tenth of the head's learning rate.
    state = load_training_state(tmp_path / "run" / "last.pt")
    initial = sorted({g["initial_lr"] for g in state["optimizer"]["param_groups"]})
    assert initial == pytest.approx([1e-4, 1e-3])
