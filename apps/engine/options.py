"""The command-line options every app's ``train`` shares, their checks, and the help format.

Imports nothing heavy, so ``--help`` and argument errors answer without loading torch.

An app builds its ``train`` parser from these groups and adds its own options to them::

    defaults = TrainingDefaults(out=None, weight_decay=0.01, schedule="poly", ...)
    add_run_options(parser, defaults)                  # --out, --resume, --stop-after-epochs
    model = parser.add_argument_group("model")
    add_model_arg_option(model)                        # --model-arg KEY=VALUE ...
    optimisation = add_optimisation_options(parser, defaults)   # --epochs ... --seed
    optimisation.add_argument("--label-smoothing", ...)          # the app's own
    add_runtime_options(parser)                        # --device ... --progress

After parsing, :func:`check_training_options` (and :func:`check_runtime_options` for every
command) refuse out-of-range values with one line naming the option, the same text in every
app. Every help text states its default once, as "(default: ...)".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AT_LEAST_ONE",
    "DECAY",
    "FRACTION",
    "NOT_NEGATIVE",
    "POSITIVE",
    "RATE",
    "RUNTIME_RULES",
    "SHARED_RECIPE_KEYS",
    "TRAINING_RULES",
    "HelpFormatter",
    "OptionError",
    "Rule",
    "TrainingDefaults",
    "add_model_arg_option",
    "app_parser",
    "add_optimisation_options",
    "add_run_options",
    "add_runtime_options",
    "check_options",
    "check_runtime_options",
    "check_training_options",
    "out_problem",
]


class OptionError(SystemExit):
    """A command-line option the run cannot use; the message names the option.

    The apps print it as one ``error: <message>`` line and exit with status 2. It is a
    SystemExit, so code that does not catch it still stops with the message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.code)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once: appended unless the help text already states it.

    Options whose default is None or off say in their help what leaving them out means.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings:
            return text
        if default is None or default is False or default is argparse.SUPPRESS:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})"


def app_parser(
    prog: str,
    description: str,
    commands: Sequence[str] = ("train", "eval", "predict", "explain", "export"),
) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """An app's top-level parser and the action its ``commands`` are added to."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )
    metavar = "{" + ",".join(commands) + "}"
    sub = parser.add_subparsers(dest="command", required=True, metavar=metavar)
    return parser, sub


@dataclass(frozen=True)
class TrainingDefaults:
    """An app's defaults for the shared training options, and the help of those it fits to
    the data (left ``None`` on the command line and chosen when the data is known)."""

    epochs_help: str
    batch_help: str
    warmup_help: str
    out: str | None = None  # the run directory when --out is left out; None: --out is required
    lr: float = 2e-3
    weight_decay: float = 0.05
    min_lr_ratio: float = 0.0
    schedule: str = "cosine"
    grad_clip: float = 1.0


#: Options of the shared groups that define a run: stored with its checkpoints and restored
#: by ``--resume`` (an app adds its own). ``warmup_steps`` holds the resolved warm-up.
SHARED_RECIPE_KEYS = (
    "model_arg", "epochs", "batch_size", "lr", "weight_decay", "schedule", "poly_power",
    "min_lr_ratio", "warmup_steps", "warmup_epochs", "ema_decay", "grad_clip", "amp", "seed",
)  # fmt: skip


def add_run_options(p: argparse.ArgumentParser, defaults: TrainingDefaults) -> None:
    """``--out``, ``--resume PATH|auto`` and ``--stop-after-epochs``."""
    out = f"default: {defaults.out}" if defaults.out else "required unless --resume PATH"
    p.add_argument(
        "--out",
        default=None,
        help=f"run directory: checkpoints, metrics.jsonl, curves.png ({out}; with --resume "
        "PATH, the folder of PATH)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="PATH|auto",
        help="continue a run from its last.pt (auto: OUT/last.pt) with the recipe and settings "
        "recorded there; runtime options still apply (default: start a new run)",
    )
    p.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        metavar="N",
        help="train N more epochs, the schedule still spanning all epochs; continue later with "
        "--resume (default: run to the end)",
    )


def add_model_arg_option(group: argparse._ActionsContainer) -> None:
    """``--model-arg KEY=VALUE ...``: several per flag, and the flag repeatable."""
    group.add_argument(
        "--model-arg",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="override PPMAConfig fields, e.g. head_hidden=256, or dims=32,64,128 "
        "depths=1,2,1 for three stages (per-stage fields not given keep the model's first "
        "entries); several per flag, repeatable (default: none)",
    )


def add_optimisation_options(
    p: argparse.ArgumentParser, defaults: TrainingDefaults
) -> argparse._ArgumentGroup:
    """The optimizer, schedule and loop options; returns the group for the app's own."""
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None, help=defaults.epochs_help)
    o.add_argument("--batch-size", type=int, default=None, help=defaults.batch_help)
    o.add_argument("--lr", type=float, default=defaults.lr,
                   help="peak AdamW learning rate, reached after the warm-up "
                        "(default: %(default)s)")  # fmt: skip
    o.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                   help="AdamW decoupled weight decay; biases, norms and other 1-D parameters "
                        "take none (default: %(default)s)")  # fmt: skip
    o.add_argument("--schedule", choices=("cosine", "poly"), default=defaults.schedule,
                   help="lr decay after the warm-up (default: %(default)s)")  # fmt: skip
    o.add_argument("--poly-power", type=float, default=1.0,
                   help="exponent of the poly decay (default: %(default)s)")  # fmt: skip
    o.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio,
                   help="final lr of the decay, as a fraction of --lr "
                        "(default: %(default)s)")  # fmt: skip
    warm = o.add_mutually_exclusive_group()
    warm.add_argument("--warmup-steps", type=int, default=None, metavar="STEPS",
                      help="linear lr warm-up in optimizer steps; must be shorter than the run "
                           f"({defaults.warmup_help})")  # fmt: skip
    warm.add_argument("--warmup-epochs", type=float, default=None, metavar="EPOCHS",
                      help="linear lr warm-up in epochs (fractions allowed), capped at half "
                           "the run (default: see --warmup-steps)")  # fmt: skip
    o.add_argument("--ema-decay", type=float, default=None,
                   help="keep an EMA of the weights with this decay, e.g. 0.999; evaluated and "
                        "exported instead of the raw weights; 0 = off (default: off)")  # fmt: skip
    o.add_argument("--grad-clip", type=float, default=defaults.grad_clip,
                   help="max global gradient norm, 0 = off (default: %(default)s)")  # fmt: skip
    o.add_argument("--amp", action="store_true",
                   help="bf16 autocast; on a CPU only where it has bf16 arithmetic (AVX-512 "
                        "BF16, AMX, Arm BF16), float32 elsewhere (default: off)")  # fmt: skip
    o.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the data order, the augmentation and any "
                        "held-out split (default: %(default)s)")  # fmt: skip
    return o


def add_runtime_options(p: argparse.ArgumentParser, *, workers: bool = True) -> None:
    """``--device``, ``--threads``, ``--workers``, ``--attention``, ``--[no-]progress``."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: auto, a GPU when there is "
                        "one)")  # fmt: skip
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process; 1 is fastest when other jobs share the "
                        "cores (default: 0, torch's choice)")  # fmt: skip
    if workers:
        g.add_argument("--workers", type=int, default=0,
                       help="data-loader worker processes (default: 0, load in the main "
                            "process)")  # fmt: skip
    g.add_argument(
        "--attention",
        choices=("native", "reference"),
        default="native",
        help="masked-attention ops: the fused native kernels (the reference where they are not "
        "built) or the pure-PyTorch reference (default: %(default)s)",
    )
    bar = g.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show progress bars (default: only on a terminal)")  # fmt: skip
    bar.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="never show progress bars")  # fmt: skip


# ------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Rule:
    """What a value must satisfy, and how the error says it (after ``--name``)."""

    ok: Callable[[float], bool]
    text: str


AT_LEAST_ONE = Rule(lambda v: v >= 1, "must be >= 1")
NOT_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")
POSITIVE = Rule(lambda v: v > 0, "must be > 0")
FRACTION = Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")
DECAY = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
RATE = DECAY  # dropout, drop path, label smoothing, a held-out share

TRAINING_RULES: dict[str, Rule] = {
    "epochs": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "stop_after_epochs": AT_LEAST_ONE,
    "lr": POSITIVE,
    "weight_decay": NOT_NEGATIVE,
    "poly_power": POSITIVE,
    "min_lr_ratio": FRACTION,
    "warmup_steps": NOT_NEGATIVE,
    "warmup_epochs": NOT_NEGATIVE,
    "ema_decay": DECAY,
    "grad_clip": NOT_NEGATIVE,
}
RUNTIME_RULES: dict[str, Rule] = {"threads": NOT_NEGATIVE, "workers": NOT_NEGATIVE}


def _bad(value: object, rule: Rule) -> bool:
    """Whether ``value`` (or an item of a list) breaks ``rule``; NaN breaks every rule, as
    every comparison with it is false."""
    if isinstance(value, list | tuple):
        return any(_bad(v, rule) for v in value)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return not rule.ok(value)


def check_options(namespace: argparse.Namespace, rules: Mapping[str, Rule]) -> None:
    """Raise :class:`OptionError` for the first given option that breaks its rule."""
    for dest, rule in rules.items():
        value = getattr(namespace, dest, None)
        if value is not None and _bad(value, rule):
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
            raise OptionError(f"--{dest.replace('_', '-')} {rule.text}, got {shown}")


def check_runtime_options(namespace: argparse.Namespace) -> None:
    check_options(namespace, RUNTIME_RULES)


def check_training_options(namespace: argparse.Namespace) -> None:
    """The shared training options' ranges (runtime options included)."""
    check_options(namespace, {**TRAINING_RULES, **RUNTIME_RULES})


def out_problem(out: str | None) -> str | None:
    """Why ``--out`` cannot be a directory (a file is there or above it), or None."""
    if out is None:
        return None
    path = Path(out)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if candidate.is_dir():
                return None
            what = "is" if candidate == path else f"is below {candidate}, which is"
            return f"--out {out} {what} a file, not a directory"
    return None
