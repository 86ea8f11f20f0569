"""The segment command line: help that states each default once, examples that parse."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from apps.segment.cli import DESCRIPTION, _check, build_parser


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"main": parser, **sub.choices}


@pytest.mark.parametrize("command", ["main", "train", "eval", "predict"])
def test_help_states_each_default_once(command):
    parser = _parsers()[command]
    text = parser.format_help()
    assert not re.search(r"\(default[^)]*\)\s*\(default", text)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        shown = formatter._expand_help(action) if action.help else ""
        name = action.option_strings[-1]
        assert shown.count("default") <= 1, f"{command} {name}: {shown}"
        if action.default is not None and action.default is not False:
            assert "default" in shown, f"{command} {name} hides its default {action.default}"


def _examples() -> list[str]:
    text = DESCRIPTION.split("examples:", 1)[1].replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def test_help_lists_examples_of_every_command():
    commands = {
        shlex.split(line)[shlex.split(line).index("apps.segment") + 1] for line in _examples()
    }
    assert commands == {"train", "eval", "predict"}


@pytest.mark.parametrize("example", _examples())
def test_every_help_example_parses_and_passes_the_checks(example):
    words = shlex.split(example)
    assert words[0] in ("python", "torchrun")
    argv = words[words.index("apps.segment") + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)  # raises SystemExit on a bad combination


def test_the_validation_split_is_never_called_test():
    for name, parser in _parsers().items():
        text = parser.format_help().replace("test-time", "")
        assert re.search(r"\btest\b", text) is None, name
