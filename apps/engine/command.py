"""The apps' ``main``: parse, check, set up the process, run the command, map errors to exits.

Exit status 0 on success, 1 when training diverged, 2 for a mistake in the command line or the
files it names (one ``error:`` line, no traceback), 130 on Ctrl-C. A value that breaks an
option's range stops right after parsing, like argparse's own errors (SystemExit 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Callable, Sequence

from apps.engine.options import OptionError, out_problem

__all__ = ["COMMAND_MODULES", "configure_process", "options_given", "run_command"]

#: The module of an app package that implements each command (``run_<command>`` in it).
COMMAND_MODULES = {
    "train": "train",
    "eval": "evaluate",
    "predict": "predict",
    "explain": "explain",
    "export": "export",
    "scenes": "scene_files",  # the detect app's built-in scenes written as a COCO dataset
}


def options_given(parser: argparse.ArgumentParser, args: argparse.Namespace) -> frozenset[str]:
    """The destinations of the options the command line set to other than their defaults
    (``args.given``: a resumed run warns about those its recipe overrides)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = sub.choices[args.command]._actions
    return frozenset(
        a.dest for a in actions if a.option_strings and getattr(args, a.dest, None) != a.default
    )


def configure_process(args: argparse.Namespace) -> None:
    """The runtime options every command has: ``--threads`` and ``--attention``.

    The attention ops' implementation is a process-wide choice of ppma_ops, made once here.
    """
    import ppma_ops
    import torch

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    ppma_ops.set_backend(getattr(args, "attention", "native"))


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    check: Callable[[argparse.Namespace], None],
    package: str,
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse ``argv``, ``check`` the options, then run the command's function on them; an
    int it returns is the exit status (anything else: 0).

    ``check`` raises :class:`OptionError` for a bad value. The command ``train`` runs
    ``<package>.train.run_train(args)``, and likewise :data:`COMMAND_MODULES` for the others;
    the module is imported only once the command line is known to be good (it loads torch).
    ``errors`` are the app's own exception types that mean bad input (printed as one line,
    exit 2), beside OptionError, CheckpointError and ValueError (the library's checks of
    option values).
    """
    args = parser.parse_args(argv)
    args.given = options_given(parser, args)
    try:
        check(args)
    except OptionError as exc:
        parser.exit(2, f"error: {exc}\n")
    from ppma_models import CheckpointError

    from apps.engine.trainer import TrainingDiverged

    try:
        problem = out_problem(getattr(args, "out", None))
        if problem is not None:
            raise OptionError(problem)
        configure_process(args)
        module = importlib.import_module(f"{package}.{COMMAND_MODULES[args.command]}")
        code = getattr(module, f"run_{args.command}")(args)
        return code if isinstance(code, int) else 0
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OptionError, CheckpointError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a model config the library refuses
        print(f"error: {textwrap.shorten(str(exc), 2000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
