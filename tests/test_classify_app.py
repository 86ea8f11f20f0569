"""apps.classify end to end on tiny data: train, resume, crash safety, torchrun, eval, predict."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.classify.cli import main
from apps.classify.weights import load_classifier
from apps.engine import MetricsLog, load_training_state, load_weights, save_training_state

REPO = Path(__file__).resolve().parents[1]


def _pythonpath() -> str:
    """The checkout first, then the path this test runs with: a subprocess imports the apps
    from here and the same ppma_models and ppma_ops as the test."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


# A two-stage model of ~10k parameters: 8x8 digits -> 2x2 -> 1x1 tokens.
TINY = [
    "--model-arg", "dims=8,16", "--model-arg", "depths=1,1", "--model-arg", "heads=2,2",
    "--model-arg", "mlp_ratios=2,2", "--model-arg", "attention_kinds=X,V",
    "--model-arg", "layer_scale=false,false", "--model-arg", "head_hidden=16",
]  # fmt: skip
FAST = ["--no-progress", "--threads", "1", "--attention", "reference"]


def _train(out: Path, *extra: str, data: str = "digits") -> int:
    args = ["train", "--data", data, "--out", str(out), "--batch-size", "32", "--lr", "3e-3"]
    return main([*args, "--subset", "256", *TINY, *FAST, *extra])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert _train(out, "--epochs", "2", "--ema-decay", "0.9") == 0
    return out


def test_train_on_digits_writes_checkpoints_metrics_and_curves(digits_run):
    for name in ("last.pt", "best.pt", "last.safetensors", "best.safetensors", "curves.png"):
        assert (digits_run / name).stat().st_size > 0, name
    records = MetricsLog(digits_run / "metrics.jsonl").read()
    assert [r["epoch"] for r in records] == [1, 2]
    # 256-image subset minus 10 % val = 230 images, all seen: 7 batches of 32 and one of 6.
    assert records[0]["train_count"] == 230
    assert 0.0 <= records[-1]["val_acc"] <= 1.0 and records[-1]["val_loss"] > 0
    state = load_training_state(digits_run / "last.pt")  # weights_only=True inside
    assert state["epoch"] == 2 and state["step"] == 16 and state["ema"] is not None
    assert state["meta"]["model"]["class_names"] == [str(d) for d in range(10)]
    # The exported weights are ppma_models' safetensors layout: its own loader rebuilds them.
    from ppma_models.checkpoint import load_model

    model = load_model(digits_run / "last.safetensors")
    assert model.class_names == [str(d) for d in range(10)] and model.num_classes == 10


def test_learning_happens_on_digits(tmp_path):
    """A few epochs on 600 digits must beat chance (10 %) clearly: real signal, not plumbing."""
    out = tmp_path / "learn"
    args = ["--epochs", "5", "--subset", "600", "--lr", "5e-3", "--warmup-epochs", "0.5"]
    assert _train(out, *args) == 0
    records = MetricsLog(out / "metrics.jsonl").read()
    assert max(r["val_acc"] for r in records) > 0.3, records
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.3, records


def _png_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("circle", "square", "stripes")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            image = (rng.random((12, 12, 3)) * 60).astype(np.uint8)
            image[..., c] += 150  # class = dominant colour channel
            Image.fromarray(image).save(root / name / f"{i}.png")
    (root / "square" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "stripes" / "notes.txt").write_text("ignored: not an image")
    return root


def test_train_on_image_folder_skips_and_reports_corrupt_file(tmp_path, capsys):
    data = _png_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    code = main(
        ["train", "--data", str(data), "--out", str(out), "--input-size", "12", "--epochs", "1",
         "--batch-size", "4", "--val-fraction", "0", *TINY, *FAST]
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "corrupt.png" in err
    state = load_training_state(out / "last.pt")
    assert state["meta"]["model"]["class_names"] == ["circle", "square", "stripes"]
    assert state["meta"]["model"]["in_chans"] == 3
    # 19 listed files in batches of 4, 4 and a last one of 3: every readable image once.
    record = MetricsLog(out / "metrics.jsonl").read()[0]
    assert record["train_count"] == 18


def _grey_folder(root: Path, n: int, seed: int, size: int = 25) -> Path:
    """Two classes of noisy grey size x size images: a bright bar (horizontal or vertical)
    or a dark blob, each at a random position -- what a user's own small data set may be."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        image = 128 + rng.normal(0, 25, (size, size))
        if i % 2 == 0:
            h, w = (3, 12) if rng.random() < 0.5 else (12, 3)
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            image[top : top + h, left : left + w] += 90
        else:
            r = rng.uniform(3, 4.5)
            cy, cx = rng.uniform(r, size - r, 2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] -= 90
        folder = root / ("bar", "blob")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def test_small_grey_folder_learns_with_default_options(tmp_path, capsys):
    """160 grey 25x25 images, two classes: the defaults must fit such data, and say so.

    With 224 px inputs and batches of 128 (one step per epoch) this reached 62.5 %."""
    data = _grey_folder(tmp_path / "grey", 160, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    settings = err[err.index("settings:") : err.index("epoch 1/")]
    assert "144 train / 16 val images" in settings and "2 classes" in settings
    assert "32x32x3 (native 25x25 -> 32" in settings
    assert "32 per process" in settings and "5 steps/epoch, every image every epoch" in settings
    assert "30 (default for small data" in settings and "= 150 steps" in settings
    assert "linear warm-up 5 steps (1 epoch)" in settings
    records = MetricsLog(out / "metrics.jsonl").read()
    assert all(r["train_count"] == 144 for r in records)
    assert max(r["val_acc"] for r in records) >= 0.9, records
    # Fresh images from the same source, never seen in training or selection.
    fresh = _grey_folder(tmp_path / "fresh", 100, seed=1)
    argv = ["eval", "--checkpoint", str(out), "--data", str(fresh), "--json"]
    assert main([*argv, "--out", str(tmp_path / "ev"), *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "all" and report["num_images"] == 100
    assert report["top1"] >= 0.9, report


def test_last_batch_of_one_image_is_left_out_and_said(tmp_path, capsys):
    data = _grey_folder(tmp_path / "grey", 19, seed=2, size=12)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "9"]
    assert main([*argv, "--val-fraction", "0", *TINY, *FAST]) == 0
    # 19 = 9 + 9 + 1: a batch of one would break BatchNorm, so that image waits an epoch.
    assert "2 steps/epoch, 1 image per epoch and process left out" in capsys.readouterr().err
    record = MetricsLog(out / "metrics.jsonl").read()[0]
    assert record["train_count"] == 18 and record["step"] == 2


def test_resume_keeps_the_resolved_settings(tmp_path, capsys):
    data = _grey_folder(tmp_path / "grey", 40, seed=3, size=12)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--stop-after-epochs", "1"]
    assert main([*argv, *TINY, *FAST]) == 0
    first = capsys.readouterr().err
    recipe = load_training_state(out / "last.pt")["meta"]["recipe"]
    # 36 training images, two-stage model (stride 8): 12 px -> 16, batch 8, 5 steps/epoch.
    assert (recipe["input_size"], recipe["batch_size"], recipe["epochs"]) == (16, 8, 30)
    assert main(["train", "--resume", str(out / "last.pt"), "--stop-after-epochs", "1", *FAST]) == 0
    second = capsys.readouterr().err
    block = lambda text: text[text.index("settings:") : text.index("epoch ")]  # noqa: E731
    assert block(first).replace("\n", "") == block(second).replace("\n", "")
    assert "native 12x12 -> 16" in block(second)


# The recipe of the runs written before run specs, whose meta was the flat model description.
FIRST_RECIPE_KEYS = (
    "data", "data_dir", "subset", "val_fraction", "input_size", "model", "model_arg", "pretrained",
    "epochs", "batch_size", "lr", "min_lr_ratio", "weight_decay", "warmup_epochs",
    "label_smoothing", "drop_path", "ema_decay", "amp", "grad_clip", "seed", "augment", "hflip",
)  # fmt: skip


def _first_layout(spec: dict) -> dict:
    """A run spec's meta as the first release of the app wrote it, before defaults were
    resolved from the data: the model description at the top, no sources of settings."""
    recipe = {k: v for k, v in spec["recipe"].items() if k in FIRST_RECIPE_KEYS}
    return {"task": "classification", **spec["model"], "dataset": spec["data"]["dataset"],
            "recipe": recipe}  # fmt: skip


def test_resume_of_a_run_from_before_defaults_were_resolved(tmp_path, capsys):
    """Such a recipe has input_size None (then meaning 224 for folders) and dropped every
    short last batch; resuming keeps both, so its schedule keeps its length."""
    data = _grey_folder(tmp_path / "grey", 40, seed=3, size=12)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--input-size", "20", "--epochs", "3"]
    assert main([*argv, "--batch-size", "8", "--stop-after-epochs", "1", *TINY, *FAST]) == 0
    state = load_training_state(out / "last.pt")
    state["meta"] = _first_layout(state["meta"])
    state["meta"]["recipe"]["input_size"] = None
    state["meta"]["recipe"]["warmup_epochs"] = 1.0
    state["step"] = state["schedule"]["last_step"] = 4  # 36 images: 4 full batches of 8
    save_training_state(state, out / "last.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "last.pt"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "20x20x3 (as in the resumed run)" in err
    assert "4 steps/epoch, 4 images per epoch and process left out" in err
    assert "= 12 steps" in err
    assert load_training_state(out / "last.pt")["step"] == 12


def _state_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_weights(path)[0]


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--epochs", "2", "--ema-decay", "0.9", "--drop-path", "0.1"]
    assert _train(straight, *common) == 0
    assert _train(split, *common, "--stop-after-epochs", "1") == 0
    assert load_training_state(split / "last.pt")["epoch"] == 1
    torch.manual_seed(999)  # perturb global RNG: resume must not depend on it
    assert main(["train", "--resume", str(split / "last.pt"), *FAST]) == 0
    a, b = _state_tensors(straight / "last.safetensors"), _state_tensors(split / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa, sb = load_training_state(straight / "last.pt"), load_training_state(split / "last.pt")
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    ra = MetricsLog(straight / "metrics.jsonl").read()
    rb = MetricsLog(split / "metrics.jsonl").read()
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]


def test_resume_of_last_pt_when_a_kill_left_only_best_pt(tmp_path):
    """A kill in the first epoch's save, after best.* and before last.*: --resume DIR/last.pt
    continues from best.pt and ends where an uninterrupted run ends."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, "--epochs", "2") == 0
    assert _train(split, "--epochs", "2", "--stop-after-epochs", "1") == 0
    (split / "last.pt").unlink()
    (split / "last.safetensors").unlink()
    assert main(["train", "--resume", str(split / "last.pt"), *FAST]) == 0
    a, b = _state_tensors(straight / "last.safetensors"), _state_tensors(split / "last.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(out, "--epochs", "3", "--stop-after-epochs", "1") == 0
    before = load_training_state(out / "last.pt")
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes hit the temp file ...
        raise KeyboardInterrupt  # ... then the process is interrupted mid-save

    monkeypatch.setattr(torch, "save", dying_save)
    assert main(["train", "--resume", str(out / "last.pt"), *FAST]) == 130
    monkeypatch.setattr(torch, "save", real_save)
    after = load_training_state(out / "last.pt")
    assert after["epoch"] == before["epoch"] == 1
    for key in before["model"]:
        assert torch.equal(before["model"][key], after["model"][key])
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert main(["train", "--resume", str(out / "last.pt"), *FAST]) == 0
    assert load_training_state(out / "last.pt")["epoch"] == 3


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "apps.classify", "train", "--data", "digits",
        "--out", str(out), "--epochs", "1", "--batch-size", "16", "--subset", "200", *TINY, *FAST,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # only rank 0 logs
    record = json.loads(lines[0])
    # 180 training images split over 2 ranks of 90 -> 5 steps of 16 and one of 10 each.
    assert record["train_count"] == 180 and record["step"] == 6
    # Validation (20 images) is sharded without padding and summed over ranks.
    assert 0.0 <= record["val_acc"] <= 1.0
    assert proc.stdout.count("done:") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "best.safetensors", "curves.png", "last.pt", "last.safetensors",
        "metrics.jsonl",
    ]  # fmt: skip


def _digits_test_images() -> tuple[np.ndarray, np.ndarray]:
    from apps.classify.datasets import load_split

    dataset, _ = load_split("digits", "test")
    return dataset.images[:, 0].numpy(), dataset.labels.numpy()


def test_eval_report_matches_independent_computation(digits_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        ["eval", "--checkpoint", str(digits_run / "best.safetensors"), "--data", "digits",
         "--out", str(out), "--json", *FAST]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert (out / "confusion.png").stat().st_size > 1000
    images, labels = _digits_test_images()
    assert report["num_images"] == len(labels) == 359  # 20 % of 1,797, rounded
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == 359 and (matrix.sum(1) == np.bincount(labels, minlength=10)).all()
    # Oracle: the model run directly on the normalised images.
    loaded = load_classifier(digits_run / "best.safetensors")
    x = (torch.from_numpy(images).float()[:, None] / 255 - loaded.mean[0]) / loaded.std[0]
    with torch.no_grad():
        logits = loaded.model(x)
    top1 = (logits.argmax(1).numpy() == labels).mean()
    top5 = (logits.topk(5, 1).indices.numpy() == labels[:, None]).any(1).mean()
    assert report["top1"] == pytest.approx(top1) and report["top5"] == pytest.approx(top5)
    assert report["per_class"]["3"]["count"] == int((labels == 3).sum())
    assert report["weights"] == "ours (safetensors)"


def test_flip_eval_scores_the_mean_of_both_views_probabilities(digits_run, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(digits_run / "best.safetensors"), "--data", "digits",
            "--out", str(tmp_path / "eval"), "--json", "--flip", *FAST]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    images, labels = _digits_test_images()
    loaded = load_classifier(digits_run / "best.safetensors")
    x = (torch.from_numpy(images).double()[:, None] / 255 - loaded.mean[0]) / loaded.std[0]
    model = loaded.model.double()
    with torch.no_grad():
        probs = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)).numpy() / 2
    assert report["flip"] is True
    assert report["top1"] == pytest.approx((probs.argmax(1) == labels).mean())
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert report["loss"] == pytest.approx(loss, rel=1e-4)


def test_eval_of_training_state_uses_ema_unless_told(digits_run, tmp_path):
    ema = load_classifier(digits_run / "last.pt")
    raw = load_classifier(digits_run / "last.pt", weights="model")
    state = load_training_state(digits_run / "last.pt")
    key = "head.fc.weight"
    assert torch.equal(ema.model.state_dict()[key], state["ema"]["module"][key])
    assert torch.equal(raw.model.state_dict()[key], state["model"][key])
    assert not torch.equal(state["ema"]["module"][key], state["model"][key])


def test_predict_folder_json_and_table(digits_run, tmp_path, capsys):
    images, labels = _digits_test_images()
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(folder / f"digit{i}.png")
    (folder / "broken.png").write_bytes(b"garbage")
    checkpoint = str(digits_run / "best.safetensors")
    code = main(["predict", str(folder), "--checkpoint", checkpoint, "--top-k", "3", "--json",
                 *FAST])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1  # one unreadable image: reported, skipped, signalled
    assert "broken.png" in captured.err
    results = json.loads(captured.out)
    assert [Path(r["path"]).name for r in results] == ["digit0.png", "digit1.png", "digit2.png"]
    loaded = load_classifier(checkpoint)
    x = (torch.from_numpy(images[:3]).float()[:, None] / 255 - loaded.mean[0]) / loaded.std[0]
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)
    for r, p in zip(results, probs, strict=True):
        got = [t["probability"] for t in r["top_k"]]
        assert got == sorted(got, reverse=True)
        assert r["top_k"][0]["index"] == int(p.argmax())
        assert r["top_k"][0]["label"] == str(int(p.argmax()))
        assert got[0] == pytest.approx(float(p.max()), abs=1e-6)
    assert main(["predict", str(folder / "digit0.png"), "--checkpoint", checkpoint, *FAST]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["image", "top-1"] and "digit0.png" in table[1]


def test_authors_checkpoint_loads_ema_by_default(tmp_path, capsys):
    import ppma_models
    from ppma_models.convert import convert_to_upstream

    config = ppma_models.PPMAConfig(
        dims=(8, 16), depths=(1, 1), heads=(2, 2), mlp_ratios=(2, 2), attention_kinds=("X", "V"),
        layer_scale=(False, False), head_hidden=16,
    )  # fmt: skip
    ppma_models.register_model("test_classify_tiny", config, overwrite=True)
    raw = ppma_models.create_model("test_classify_tiny", num_classes=4)
    ema = ppma_models.create_model("test_classify_tiny", num_classes=4)
    path = tmp_path / "authors.pth"
    torch.save(
        {"model": convert_to_upstream(raw.state_dict()),
         "model_ema": convert_to_upstream(ema.state_dict()),
         "epoch": 299, "args": argparse.Namespace(model="some_upstream_name", lr=1e-3)},
        path,
    )  # fmt: skip
    image = (np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    x = load_classifier(path, model_name="test_classify_tiny")
    assert x.source == "authors (model_ema)" and x.input_size == (224, 224)
    for name, reference in (("ema", ema), ("model", raw)):
        extra = ["--no-ema"] if name == "model" else []
        argv = ["predict", str(tmp_path / "photo.png"), "--checkpoint", str(path), "--json"]
        code = main([*argv, "--model", "test_classify_tiny", "--top-k", "4", *extra, *FAST])
        assert code == 0
        result = json.loads(capsys.readouterr().out)[0]
        from apps.classify.transforms import Preprocess

        pre = Preprocess((224, 224), x.mean, x.std, channels=3)
        tensor = pre(torch.from_numpy(image).permute(2, 0, 1))[None]
        with torch.no_grad():
            expected = reference.eval()(tensor).softmax(1)[0]
        got = {t["index"]: t["probability"] for t in result["top_k"]}
        assert got == pytest.approx({i: float(p) for i, p in enumerate(expected)}, abs=1e-5)
        assert result["top_k"][0]["label"].startswith("class_")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "no-such-set"], "not a built-in data set"),
        (["train", "--data", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install"),
        (["train", "--data", "digits", "--model-arg", "nonsense"], "KEY=VALUE"),
        (["train", "--data", "digits", "--model-arg", "colour=3"], "unknown PPMAConfig field"),
        (["train", "--data", "digits", "--model-arg", "heads=3,3,3,3"], "must divide"),
        (["eval", "--checkpoint", "/nonexistent.safetensors"], "does not exist"),
        (["train", "--resume", "/nonexistent/last.pt"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys):
    code = main([*argv, *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("error: ")


def test_bad_files_give_clear_errors(tmp_path, digits_run, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    assert main(["eval", "--checkpoint", str(junk), "--data", "digits", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "junk.pt" in err and "Traceback" not in err
    text = tmp_path / "a.txt"
    text.write_text("hello")
    ckpt = str(digits_run / "best.safetensors")
    assert main(["predict", str(text), "--checkpoint", ckpt, *FAST]) == 2
    assert "none of the 1 input image(s) could be read" in capsys.readouterr().err
    # The digits model has 10 classes; a 3-class folder cannot be evaluated with it.
    data = _png_folder(tmp_path / "imgs")
    assert main(["eval", "--checkpoint", ckpt, "--data", str(data), *FAST]) == 2
    assert "not among the model's classes" in capsys.readouterr().err


def test_argparse_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "0"])
    assert exc.value.code == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--resume" in text and "torchrun" in text and "examples:" in text


def test_cli_subprocess_error_without_traceback():
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    run = subprocess.run(
        [sys.executable, "-m", "apps.classify", "eval", "--checkpoint", "/nope.pt"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr and "/nope.pt" in run.stderr


def test_imagenet_layout_uses_train_and_val_folders(tmp_path, capsys):
    root = tmp_path / "imagenet"
    _png_folder(root / "train")
    _png_folder(root / "val")
    (root / "val" / "square" / "corrupt.png").unlink()
    out = tmp_path / "run"
    argv = ["train", "--data", str(root), "--out", str(out), "--input-size", "12", "--epochs", "1"]
    assert main([*argv, "--batch-size", "4", *TINY, *FAST]) == 0
    # Validation comes from val/ (18 images), not from a 10 % split of the 19 train/ files.
    assert "19 train / 18 val images" in capsys.readouterr().err
    assert "val_acc" in MetricsLog(out / "metrics.jsonl").read()[0]
    eval_argv = ["eval", "--checkpoint", str(out), "--data", str(root), "--json"]
    assert main([*eval_argv, "--out", str(tmp_path / "ev"), *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    # The images that picked the best epoch are reported as val, never as test.
    assert report["split"] == "val" and report["num_images"] == 18  # the readable val/ ones
    assert sorted(report["per_class"]) == ["circle", "square", "stripes"]
    assert main([*eval_argv[:-1], "--out", str(tmp_path / "ev2"), *FAST]) == 0
    summary = capsys.readouterr().out
    assert "val: 18 images, top-1 accuracy" in summary and "top-3 accuracy" in summary
    assert main([*eval_argv, "--split", "test", *FAST]) == 2
    assert "no test/ folder, only train, val" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(out), "--data", "digits", "--split", "val"]) == 2
    assert "not a split of their own" in capsys.readouterr().err
