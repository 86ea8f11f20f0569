"""The detect app end to end on tiny data: train, eval, predict, resume, COCO folders, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import ppma_models
import pytest
import torch
from PIL import Image

from apps.detect.cli import build_parser, main
from apps.detect.model import load_run, load_trained, scene_settings
from apps.detect.scenes import INSTANCE_CLASSES
from apps.engine.checkpoint import load_training_state
from apps.segment.cli import build_parser as segment_parser
from apps.segment.cli import main as segment_main

ROOT = Path(__file__).resolve().parents[1]

# A tiny detector on tiny scenes: each run is a few optimizer steps of a few images.
TINY = [
    "--batch-size", "4", "--warmup-steps", "0", "--no-progress", "--lr", "1e-3",
    "--model-arg", "dims=16,32,64", "--model-arg", "depths=1,1,1", "--model-arg", "heads=2,2,4",
    "--model-arg", "mlp_ratios=2,2,2", "--model-arg", "attention_kinds=X,X,V",
    "--model-arg", "layer_scale=false,false,false",
    "--detector-arg", "fpn_channels=16", "--detector-arg", "box_head_width=32",
    "--detector-arg", "mask_head_convs=1", "--detector-arg", "mask_head_channels=8",
    "--detector-arg", "box_score_thresh=0.0",
]  # fmt: skip
SCENES = [
    "--data", "scenes", "--canvas", "32", "--min-size", "12", "--max-size", "20",
    "--train-scenes", "8", "--val-scenes", "6",
]  # fmt: skip


def _train(out: Path, *extra: str, data: list[str] = SCENES) -> None:
    assert main(["train", *data, *TINY, "--out", str(out), *extra]) == 0


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("det") / "run"
    _train(run, "--epochs", "2")
    return run


@pytest.mark.fashion_mnist  # built-in scenes paste Fashion-MNIST items
def test_train_writes_checkpoints_metrics_and_curves(trained_run):
    for name in ("last.pt", "best.pt", "last.safetensors", "best.safetensors", "curves.png"):
        assert (trained_run / name).is_file(), name
    records = _records(trained_run)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["val_box_ap"] <= 1.0 and 0.0 <= r["val_mask_ap50"] <= 1.0
        assert all(np.isfinite(r[f"train_{k}"]) for k in ("loss", "classifier", "mask"))
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["val_box_ap"] == records[-1]["val_box_ap"]


@pytest.mark.fashion_mnist
def test_eval_reproduces_the_training_evaluation(trained_run, tmp_path, capsys):
    args = ["eval", str(trained_run / "last.safetensors"), "--batch-size", "4",
            "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    last = _records(trained_run)[-1]
    # Same held-out scenes (recorded with the run), same weights: same numbers.
    assert report["box"]["ap"] == pytest.approx(last["val_box_ap"], abs=1e-12)
    assert report["mask"]["ap50"] == pytest.approx(last["val_mask_ap50"], abs=1e-12)
    assert report["detections"] > 0 and len(report["box"]["per_class_ap"]) == 10
    assert (tmp_path / "pr.png").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == report["detections"]
    assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    out = capsys.readouterr().out
    assert "AP50" in out and "Sneaker" in out


@pytest.mark.fashion_mnist
def test_predict_draws_and_writes_the_models_detections(trained_run, tmp_path):
    model, spec = load_trained(trained_run)
    image = np.zeros((32, 32), np.uint8)
    image[8:24, 6:20] = 180
    Image.fromarray(image).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["predict", str(trained_run), str(tmp_path / "a.png"), str(tmp_path / "broken.png"),
            "--out", str(out), "--score-thresh", "0.0"]  # fmt: skip
    assert main(args) == 0
    picture = np.asarray(Image.open(out / "a_detections.png"))
    assert picture.shape == (32, 32, 3)
    results = json.loads((out / "results.json").read_text())
    x = torch.from_numpy(image).float().div(255).expand(3, -1, -1)
    with torch.no_grad():
        (expected,) = model([x])
    assert len(results) == len(expected["scores"]) > 0
    assert [r["score"] for r in results] == pytest.approx(expected["scores"].tolist())
    assert {r["category_id"] for r in results} <= set(spec.category_ids)
    assert json.loads((out / "images.json").read_text())[0]["file_name"].endswith("a.png")


@pytest.mark.fashion_mnist
def test_resume_continues_exactly(trained_run, tmp_path):
    run = tmp_path / "resumed"
    _train(run, "--epochs", "2", "--stop-after-epochs", "1")
    assert [r["epoch"] for r in _records(run)] == [1]
    # --resume auto restores the recorded recipe: the data, model and schedule need no repeating.
    assert main(["train", "--out", str(run), "--resume", "auto", "--no-progress"]) == 0
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    ours = load_training_state(run / "last.pt")["model"]
    reference = load_training_state(trained_run / "last.pt")["model"]
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.fashion_mnist
def test_scenes_written_as_coco_train_the_same_way(tmp_path):
    data = tmp_path / "data"
    args = ["scenes", "--out", str(data), "--canvas", "32", "--min-size", "12",
            "--max-size", "20", "--train-scenes", "8", "--val-scenes", "6"]  # fmt: skip
    assert main(args) == 0
    assert (data / "instances_train.json").is_file() and len(
        list((data / "images").iterdir())
    ) == 14
    # Folders default to mmdetection's image sizes; given the scenes' settings they train alike.
    tiny = {arg.split("=")[0] for arg in TINY if "=" in arg}
    settings = scene_settings(32).items()
    same = [f"--detector-arg={k}={json.dumps(v)}" for k, v in settings if k not in tiny]
    _train(tmp_path / "coco", "--epochs", "1", *same, data=["--data", str(data)])
    _train(tmp_path / "scenes", "--epochs", "1")
    coco, scenes = _records(tmp_path / "coco")[0], _records(tmp_path / "scenes")[0]
    # Same pixels, same instances, same order: the same losses and scores.
    assert coco["train_loss"] == pytest.approx(scenes["train_loss"], rel=1e-5)
    assert coco["val_box_ap"] == pytest.approx(scenes["val_box_ap"], abs=1e-9)
    model, spec = load_trained(tmp_path / "coco")
    assert spec.category_ids == tuple(range(1, 11)) and spec.class_names[7] == "Sneaker"


def test_bad_coco_folder_is_reported_with_every_problem(tmp_path, capsys):
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "images" / "a.png")
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20},
                   {"id": 2, "file_name": "missing.png", "width": 20, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8],
             "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [15, 15, 10, 10],
             "segmentation": [[15, 15, 19, 15, 19, 19]]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    (root / "instances_all.json").write_text(json.dumps(doc))
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "missing.png: missing" in err and "a.png: annotation 2: box [15, 15, 10, 10]" in err
    assert "--skip-bad" in err


def test_options_of_the_other_kind_of_data_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path), "--canvas", "32", "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "--canvas applies to --data scenes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", *SCENES, "--skip-bad", "--out", str(tmp_path / "o")])
    assert "--skip-bad applies to COCO folder data" in capsys.readouterr().err


@pytest.mark.fashion_mnist
def test_bad_arguments_and_files_give_clear_errors(trained_run, tmp_path, capsys):
    assert main(["train", *SCENES, *TINY, "--out", str(tmp_path / "a"),
                 "--detector-arg", "fpn_width=3"]) == 2  # fmt: skip
    assert "unknown DetectionSettings field(s) ['fpn_width']" in capsys.readouterr().err
    assert main(["train", *SCENES, *TINY, "--out", str(tmp_path / "b"),
                 "--model-arg", "dims=16,32"]) == 2  # fmt: skip
    assert "--model-arg" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert main(["eval", str(tmp_path / "junk.safetensors")]) == 2
    assert "junk.safetensors" in capsys.readouterr().err
    assert main(["predict", str(trained_run), str(tmp_path / "nothing.png")]) == 2
    assert "nothing.png does not exist" in capsys.readouterr().err


@pytest.mark.fashion_mnist
@pytest.mark.slow
def test_torchrun_two_processes_match_a_single_process_evaluation(tmp_path):
    run = tmp_path / "ddp"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "apps.detect", "train", *SCENES, *TINY, "--out", str(run),
           "--epochs", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = _records(run)[-1]
    assert record["train_count"] == 8  # two ranks x one batch of 4: the counts were summed
    # The ranks detected on disjoint shards; gathered, they score as one process does.
    threads = torch.get_num_threads()
    try:
        args = ["eval", str(run / "last.safetensors"), "--batch-size", "4", "--threads", "1",
                "--out", str(tmp_path / "ev"), "--no-progress"]  # fmt: skip
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["box"]["ap"] == pytest.approx(record["val_box_ap"], abs=1e-12)
    assert report["mask"]["ap"] == pytest.approx(record["val_mask_ap"], abs=1e-12)


@pytest.mark.fashion_mnist
def test_weights_are_read_by_ppma_models_load_model(trained_run):
    path = trained_run / "best.safetensors"
    model = ppma_models.load_model(path).eval()
    ours, run = load_run(path)
    assert model.class_names == list(INSTANCE_CLASSES) and run.app == "detect"
    assert run.recipe["train_scenes"] == 8 and run.recipe["detector_arg"][0] == "fpn_channels=16"
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours([image])[0], model([image])[0]
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(expected[key], got[key]), key


def _train_actions(parser) -> dict:
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["train"]._actions if a.option_strings}


def test_the_shared_options_are_the_segment_apps_options():
    detect, segment = _train_actions(build_parser()), _train_actions(segment_parser())
    shared = [
        "out", "resume", "stop_after_epochs", "model_arg", "epochs", "batch_size", "lr",
        "weight_decay", "schedule", "poly_power", "min_lr_ratio", "warmup_steps",
        "warmup_epochs", "ema_decay", "grad_clip", "amp", "seed", "device", "threads",
        "workers", "attention", "progress",
    ]  # fmt: skip
    for dest in shared:
        a, b = detect[dest], segment[dest]
        assert a.option_strings == b.option_strings and a.type == b.type, dest
        assert a.nargs == b.nargs and a.choices == b.choices, dest


@pytest.mark.parametrize(
    ("option", "value"),
    [("--epochs", "0"), ("--lr", "nan"), ("--ema-decay", "1"), ("--warmup-epochs", "-1")],
)
def test_shared_options_are_refused_with_the_segment_apps_line(tmp_path, capsys, option, value):
    lines = []
    for app in (main, segment_main):
        argv = ["train", "--data", "scenes", "--out", str(tmp_path / "run"), option, value]
        with pytest.raises(SystemExit) as info:
            app(argv)
        assert info.value.code == 2
        lines.append(capsys.readouterr().err.strip())
    assert lines[0] == lines[1] and lines[0].startswith(f"error: {option} must be")
    assert not (tmp_path / "run").exists()
