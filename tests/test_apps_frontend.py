"""The front end the apps share (apps.engine): one set of training options with one error
text, --model-arg in both forms, --resume auto and the recorded recipe in both apps, weights
in ppma_models' layout (and the earlier layouts still read), one checkpoint error type."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import ppma_models
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from apps.classify.cli import build_parser as classify_parser
from apps.classify.cli import main as classify_main
from apps.classify.weights import load_classifier
from apps.engine import CheckpointError, MetricsLog, load_training_state, save_weights
from apps.engine.model_args import model_overrides
from apps.segment.cli import build_parser as segment_parser
from apps.segment.cli import main as segment_main
from apps.segment.model import load_trained

CLASSIFY_TINY = [
    "--model-arg", "dims=8,16", "depths=1,1", "heads=2,2", "mlp_ratios=2,2",
    "attention_kinds=X,V", "layer_scale=false,false", "--model-arg", "head_hidden=16",
]  # fmt: skip
FAST = ["--no-progress", "--threads", "1", "--attention", "reference"]
SEGMENT_TINY = [
    "--channels", "8", "--aux-channels", "4", "--crop", "16", "--batch-size", "4",
    "--model-arg", "dims=8,16", "depths=1,1", "heads=2,2", "mlp_ratios=2,2",
    "--model-arg", "attention_kinds=X,V", "--model-arg", "layer_scale=false,false",
]  # fmt: skip


def _exit_status(main, argv: list[str]) -> int:
    """The exit status of a CLI run, whether it returns it or raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ one set of options
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--epochs", "0", "--epochs must be >= 1, got 0"),
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--lr", "0", "--lr must be > 0, got 0.0"),
        ("--lr", "nan", "--lr must be > 0, got nan"),
        ("--weight-decay", "-0.1", "--weight-decay must be >= 0, got -0.1"),
        ("--min-lr-ratio", "2", "--min-lr-ratio must be in [0, 1], got 2.0"),
        ("--warmup-steps", "-1", "--warmup-steps must be >= 0, got -1"),
        ("--warmup-epochs", "-1", "--warmup-epochs must be >= 0, got -1.0"),
        ("--ema-decay", "1", "--ema-decay must be in [0, 1), got 1.0"),
        ("--grad-clip", "-1", "--grad-clip must be >= 0, got -1.0"),
        ("--poly-power", "0", "--poly-power must be > 0, got 0.0"),
        ("--stop-after-epochs", "0", "--stop-after-epochs must be >= 1, got 0"),
        ("--threads", "-2", "--threads must be >= 0, got -2"),
        ("--workers", "-1", "--workers must be >= 0, got -1"),
    ],
)
def test_shared_options_are_refused_with_the_same_line_in_both_apps(
    tmp_path, capsys, option, value, message
):
    out = str(tmp_path / "run")
    classify = ["train", "--data", "digits", "--out", out, option, value]
    segment = ["train", "--data", "scenes", "--out", out, option, value]
    assert _exit_status(classify_main, classify) == 2
    line = _error_line(capsys)
    assert _exit_status(segment_main, segment) == 2
    assert _error_line(capsys) == line == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_gives_the_same_line_in_both_apps(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert classify_main(["train", "--data", "digits", "--out", str(existing), *FAST]) == 2
    line = _error_line(capsys)
    assert segment_main(["train", "--data", "scenes", "--out", str(existing), *FAST]) == 2
    assert _error_line(capsys) == line == f"error: --out {existing} is a file, not a directory"


def _train_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["train"]._actions if a.option_strings}


def test_the_shared_options_are_the_same_options_in_both_apps():
    classify, segment = _train_actions(classify_parser()), _train_actions(segment_parser())
    shared = [
        "out", "resume", "stop_after_epochs", "model_arg", "epochs", "batch_size", "lr",
        "weight_decay", "schedule", "poly_power", "min_lr_ratio", "warmup_steps",
        "warmup_epochs", "ema_decay", "grad_clip", "amp", "seed", "device", "threads",
        "workers", "attention", "progress",
    ]  # fmt: skip
    for dest in shared:
        a, b = classify[dest], segment[dest]
        assert a.option_strings == b.option_strings and a.type == b.type, dest
        assert a.nargs == b.nargs and a.choices == b.choices, dest
    # Only the app's own defaults differ: those it fits to the data, the run directory, and
    # the optimisation recipe each task was tuned with.
    same_help = {"resume", "stop_after_epochs", "model_arg", "lr", "schedule", "poly_power",
                 "warmup_epochs", "ema_decay", "amp", "seed", "device", "threads", "workers",
                 "attention"}  # fmt: skip
    for dest in same_help:
        assert classify[dest].help == segment[dest].help, dest


@pytest.mark.parametrize(
    "forms",
    [
        ["--model-arg", "dims=8,16", "depths=1,1", "head_hidden=16"],
        ["--model-arg", "dims=8,16", "--model-arg", "depths=1,1", "--model-arg", "head_hidden=16"],
        ["--model-arg", "dims=8,16", "depths=1,1", "--model-arg", "head_hidden=16"],
    ],
)
def test_model_arg_takes_several_items_and_repeats_in_both_apps(forms):
    items = ["dims=8,16", "depths=1,1", "head_hidden=16"]
    for parser in (classify_parser(), segment_parser()):
        args = parser.parse_args(["train", "--data", "scenes", *forms])
        assert args.model_arg == items
    expected = {"dims": (8, 16), "depths": (1, 1), "head_hidden": 16, "heads": (2, 2),
                "mlp_ratios": (3, 3), "attention_kinds": ("X", "X"),
                "layer_scale": (False, False)}  # fmt: skip
    assert model_overrides("ppma_nano", items) == expected


# ------------------------------------------------------------------ classify: --resume auto
def _classify(out: Path, *extra: str) -> int:
    argv = ["train", "--data", "digits", "--subset", "128", "--batch-size", "32", "--epochs", "2"]
    return classify_main([*argv, "--out", str(out), *CLASSIFY_TINY, *FAST, *extra])


def test_classify_resume_auto_continues_the_run_in_out_with_its_recipe(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _classify(straight) == 0
    assert _classify(split, "--stop-after-epochs", "1") == 0
    capsys.readouterr()
    # Only the run directory: data, model and optimisation come from the recorded recipe.
    assert classify_main(["train", "--out", str(split), "--resume", "auto", *FAST]) == 0
    err = capsys.readouterr().err
    assert f"resumed from {split / 'last.pt'}: 1 epoch(s)" in err
    a, b = load_file(straight / "last.safetensors"), load_file(split / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["train_loss"] for r in MetricsLog(run / "metrics.jsonl").read()]
              for run in (straight, split)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_classify_resume_auto_needs_a_run_to_continue(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "empty"), "--resume", "auto", *FAST]
    assert classify_main(argv) == 2
    assert "last.pt does not exist" in _error_line(capsys)


def test_resume_warns_about_given_options_its_recipe_overrides(tmp_path, capsys):
    run = tmp_path / "run"
    assert _classify(run, "--stop-after-epochs", "1") == 0
    capsys.readouterr()
    argv = ["train", "--resume", str(run / "last.pt"), "--lr", "0.5", "--epochs", "2", *FAST]
    assert classify_main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: --lr 0.5 is not used: a resumed run keeps the value of its recipe" in err
    assert "--epochs" not in err.split("resumed from")[0]  # given as recorded: no warning
    assert load_training_state(run / "last.pt")["meta"]["recipe"]["lr"] == 0.002


def test_resume_into_another_out_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _classify(run, "--stop-after-epochs", "1") == 0
    capsys.readouterr()
    argv = ["train", "--resume", str(run / "last.pt"), "--out", str(tmp_path / "other"), *FAST]
    assert classify_main(argv) == 2
    assert "continues its run in" in _error_line(capsys)


def _as_first_classify_layout(path: Path) -> None:
    """Rewrite a run's weights file with the metadata the first release wrote: the model
    description itself (with ``task``) under ``classify``, no run spec around it."""
    tensors = load_file(path)
    meta = ppma_models.read_metadata(path)
    spec = json.loads(meta["classify"])
    flat = {"task": "classification", **spec["model"], "dataset": spec["data"]["dataset"]}
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    save_file(tensors, path, metadata={**header, "classify": json.dumps(flat)})


def test_classify_weights_of_the_first_layout_still_load(tmp_path):
    run = tmp_path / "run"
    assert _classify(run) == 0
    new = load_classifier(run / "best.safetensors")
    _as_first_classify_layout(run / "best.safetensors")
    old = load_classifier(run / "best.safetensors")
    assert (old.class_names, old.input_size, old.mean, old.std) == (
        new.class_names, new.input_size, new.mean, new.std,
    )  # fmt: skip
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(old.model(x), new.model(x), rtol=0, atol=0)


# --------------------------------------------------------------- segment: one weights format
def _blob_folder(root: Path, count: int = 10, size: int = 16) -> Path:
    """Bright squares (class 1) on noise (class 0), images/ + masks/ + classes.txt."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(0, size - 6, 2)
        mask[top : top + 6, left : left + 6] = 1
        image = (rng.integers(0, 60, (size, size, 3)) + mask[..., None] * 150).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"b{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{i}.png")
    (root / "classes.txt").write_text("ground\nblob\n")
    return root


def _segment(data: Path, out: Path, *extra: str) -> int:
    argv = ["train", "--data", str(data), "--out", str(out), "--epochs", "2", *SEGMENT_TINY]
    return segment_main([*argv, "--val-fraction", "0.2", "--lr", "3e-3", *FAST, *extra])


@pytest.fixture(scope="module")
def segment_runs(tmp_path_factory) -> dict[str, Path]:
    """A folder run straight through, and the same run stopped after an epoch and resumed
    with nothing but ``--resume PATH``."""
    base = tmp_path_factory.mktemp("frontend-seg")
    data = _blob_folder(base / "data")
    assert _segment(data, base / "straight") == 0
    assert _segment(data, base / "split", "--stop-after-epochs", "1") == 0
    assert segment_main(["train", "--resume", str(base / "split" / "last.pt"), *FAST]) == 0
    return {"data": data, "straight": base / "straight", "split": base / "split"}


def test_segment_resume_restores_the_recorded_recipe(segment_runs):
    a = load_file(segment_runs["straight"] / "last.safetensors")
    b = load_file(segment_runs["split"] / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = load_training_state(segment_runs["split"] / "last.pt")
    recipe = state["meta"]["recipe"]
    assert (recipe["crop"], recipe["channels"], recipe["val_fraction"]) == (16, 8, 0.2)
    assert state["epoch"] == 2


def test_segment_weights_are_read_by_ppma_models_load_model(segment_runs):
    path = segment_runs["straight"] / "best.safetensors"
    model = ppma_models.load_model(path)
    assert isinstance(model, ppma_models.SegmentationModel)
    assert model.class_names == ["ground", "blob"] and model.num_classes == 2
    spec = json.loads(ppma_models.read_metadata(path)["segment"])
    assert spec["app"] == "segment" and spec["model"]["class_names"] == ["ground", "blob"]
    app_model, app_spec = load_trained(path)
    assert app_spec.crop == 16
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), app_model(x), rtol=0, atol=0)


def test_segment_weights_of_the_earlier_layout_still_load_and_evaluate(
    segment_runs, tmp_path, capsys
):
    """Runs written before stored the state dict with the run's meta as JSON."""
    path = segment_runs["straight"] / "best.safetensors"
    new_model, new_spec = load_trained(path)
    spec = json.loads(ppma_models.read_metadata(path)["segment"])
    old = tmp_path / "best.safetensors"
    meta = {"app": "segment", "model": spec["model"], "data": spec["data"], "epoch": 2}
    save_weights(new_model.state_dict(), old, meta)
    old_model, old_spec = load_trained(old)
    assert old_spec == new_spec
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(old_model(x), new_model(x), rtol=0, atol=0)
    argv = ["eval", str(old), "--out", str(tmp_path / "a"), "--no-progress"]
    assert segment_main([*argv, "--attention", "reference"]) == 0
    assert segment_main(["eval", str(path), "--out", str(tmp_path / "b"), *FAST]) == 0
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert a["miou"] == b["miou"] and a["images"] == b["images"] == 2


def test_checkpoint_errors_are_the_library_error(tmp_path):
    assert CheckpointError is ppma_models.CheckpointError
    with pytest.raises(ppma_models.CheckpointError, match="does not exist"):
        load_trained(tmp_path / "missing.safetensors")
    with pytest.raises(ppma_models.CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")
