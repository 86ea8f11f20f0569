"""apps.classify: defaults resolved from the data, the help text and its examples."""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image
from ppma_models.registry import get_config

from apps.classify import train as train_module
from apps.classify.cli import EPILOGS, build_parser
from apps.classify.predict import format_table
from apps.classify.settings import (
    DEFAULT_EPOCHS,
    MIN_TOTAL_STEPS,
    measure_image_size,
    model_stride,
    resolve_batch_size,
    resolve_epochs,
    resolve_input_size,
    resolve_warmup,
)
from apps.classify.train import build_classifier
from apps.engine.model_args import model_overrides


def _save(path, height, width):
    Image.fromarray(np.zeros((height, width), np.uint8)).save(path)
    return str(path)


def test_measured_size_is_the_median_of_readable_images(tmp_path):
    paths = [_save(tmp_path / f"{i}.png", 25, 25) for i in range(5)]
    paths.append(_save(tmp_path / "big.png", 480, 640))  # an outlier does not move the median
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.append(str(tmp_path / "bad.png"))
    assert measure_image_size(paths) == (25, 25)
    assert measure_image_size([str(tmp_path / "bad.png")]) is None
    # Only a sample is read, spread over the whole (class-sorted) list of files.
    mixed = [_save(tmp_path / "a.png", 20, 30)] * 30 + [_save(tmp_path / "b.png", 40, 60)] * 70
    assert measure_image_size(mixed, sample=10) == (40, 60)
    assert measure_image_size(mixed[::-1], sample=10) == (40, 60)


def test_model_stride_follows_the_stages_and_the_stem():
    tiny = get_config("ppma_tiny")
    assert model_stride(tiny) == 32
    assert model_stride(tiny.replace(stem_stride=2)) == 16
    three = tiny.replace(dims=(64, 128, 256), depths=(1, 1, 1), heads=(2, 4, 8),
                         mlp_ratios=(3, 3, 3), attention_kinds=("X", "X", "V"),
                         layer_scale=(False, False, False))  # fmt: skip
    assert model_stride(three) == 16
    assert model_stride(three.replace(stem_stride=2)) == 8


@pytest.mark.parametrize(
    ("kwargs", "size", "source"),
    [
        ({"measured": (25, 25)}, 32, "native 25x25 -> 32"),
        ({"measured": (20, 28), "stride": 16}, 32, "native 20x28 -> 32"),
        ({"measured": (64, 64)}, 64, "native 64x64 -> 64"),
        ({"measured": (65, 30)}, 224, "over 64 px"),
        ({"measured": None}, 224, "no readable image"),
        ({"measured": (25, 25), "pretrained": True}, 224, "--pretrained"),
        ({"builtin_size": 28, "measured": None}, 28, "native 28x28"),
    ],
)
def test_input_size_default(kwargs, size, source):
    kwargs = {"builtin_size": None, "stride": 32, **kwargs}
    got, where = resolve_input_size(None, **kwargs)
    assert got == size and source in where


def test_given_options_always_win():
    assert resolve_input_size(48, builtin_size=28, measured=(25, 25), stride=32)[0] == 48
    assert resolve_batch_size(7, 144) == (7, "--batch-size")
    assert resolve_epochs(3, 1) == (3, "--epochs")
    assert resolve_warmup(0.5, 10, 100)[0] == 5


def test_batch_size_default_gives_several_steps_per_epoch():
    assert resolve_batch_size(None, 144)[0] == 32  # the 160-image folder minus 10 % val
    assert resolve_batch_size(None, 54_000)[0] == 128
    assert resolve_batch_size(None, 10)[0] == 2


def test_epochs_default_grows_for_small_data():
    assert resolve_epochs(None, 422) == (DEFAULT_EPOCHS, "default")  # Fashion-MNIST
    epochs, where = resolve_epochs(None, 5)  # 144 images in batches of 32
    assert epochs == MIN_TOTAL_STEPS // 5 and "small data" in where
    assert resolve_epochs(None, 1)[0] == 100  # at most 100 epochs


def test_warmup_is_a_share_of_the_run_never_longer():
    assert resolve_warmup(None, 5, 150) == (5, "1 epoch")
    steps, where = resolve_warmup(None, 8, 16)  # a 2-epoch run: 10 % of it
    assert steps == 1 and "capped at 10% of the run" in where
    steps, where = resolve_warmup(5, 10, 20)  # more warm-up than run
    assert steps == 10 and where == "--warmup-epochs 5, capped at 50% of the run"


# ------------------------------------------------------------------------- help


def _subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_every_option_states_its_default_once(command):
    helps: dict[str, str] = {}
    for action in _subparsers()[command]._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            text = (action.help or "") % {"default": action.default}
            helps[action.dest] = helps.get(action.dest, "") + " " + text
    for dest, text in helps.items():
        assert text.count("default") == 1, (dest, text)
    rendered = _subparsers()[command].format_help()
    assert "%(" not in rendered and "(default: None)" not in rendered


def _examples(epilog: str) -> list[list[str]]:
    """Each example command of an epilog, as the argv that follows ``-m apps.classify``."""
    text = epilog.replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if "-m apps.classify" in line]
    return [shlex.split(line.split("-m apps.classify", 1)[1]) for line in lines]


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_help_examples_parse(command):
    examples = _examples(EPILOGS[command])
    assert len(examples) >= 2
    for argv in examples:
        args = build_parser().parse_args(argv)  # argparse exits on anything it rejects
        assert args.command == command


def _model_args_in_help() -> list[str]:
    (action,) = [a for a in _subparsers()["train"]._actions if a.dest == "model_arg"]
    return re.findall(r"\b\w+=[\w.,]+\w", action.help)


def test_model_arg_examples_build_models():
    combos = [args for argv in _examples(EPILOGS["train"]) if "--model-arg" in argv
              for args in [build_parser().parse_args(argv)]]  # fmt: skip
    assert combos, "the train examples show --model-arg"
    help_items = _model_args_in_help()
    assert {"head_hidden=256", "dims=32,64,128", "depths=1,2,1"} <= set(help_items)
    combos.append(build_parser().parse_args(["train", "--model-arg", *help_items]))
    for args in combos:
        overrides = model_overrides(args.model, args.model_arg)
        model = build_classifier(args, num_classes=10, in_chans=1, overrides=overrides)
        assert model.config.num_stages == len(overrides["dims"])
        with torch.no_grad():
            assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


# ---------------------------------------------------------------------- predict


def test_predict_table_columns_line_up_with_their_headers():
    results = [
        {"path": "a.png", "top_k": [{"label": "t-shirt/top", "probability": 0.912},
                                    {"label": "bag", "probability": 0.05}]},
        {"path": "folder/longer-name.png", "top_k": [{"label": "bag", "probability": 0.5},
                                                     {"label": "ankle boot", "probability": 0.4}]},
    ]  # fmt: skip
    header, *rows = format_table(results, 2).splitlines()
    starts = [header.index(name) for name in ("image", "top-1", "top-2")]
    for row, result in zip(rows, results, strict=True):
        cells = [result["path"]] + [
            f"{t['label']} ({t['probability']:.3f})" for t in result["top_k"]
        ]
        for start, cell in zip(starts, cells, strict=True):
            assert row[start:].startswith(cell), (row, cell)
            assert start == 0 or row[start - 1] == " "


@pytest.mark.parametrize(
    "options, crop, hflip",
    [
        (["--hflip"], True, True),
        (["--augment", "flip", "--hflip"], False, True),
        (["--augment", "flip"], False, False),  # digits: no flips unless asked for
        (["--augment", "none", "--hflip"], False, False),
    ],
)
def test_augment_choice_sets_the_training_crops_and_flips(options, crop, hflip):
    args = build_parser().parse_args(["train", "--data", "digits", *options])
    args.input_size = 8
    data = train_module._load_data(args, {})
    train_module._set_transforms(args, data)
    assert (data.train.transform.crop, data.train.transform.hflip) == (crop, hflip)
    assert data.val.transform.train is False
