"""Settings chosen when a run starts: a value and where it came from, and their table.

Options whose good value depends on the data (batch size, epochs, warm-up, input size or
crop) are ``None`` on the command line; each app turns them into :class:`Choice` values by its
own rules, and the run prints them with the other settings as one ``settings:`` table before
the first epoch. The sources are stored with the run, so a resumed run prints the same table.
Imports nothing heavy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from apps.engine.options import OptionError
from apps.engine.schedule import warmup_steps

__all__ = [
    "MAX_GIVEN_WARMUP_SHARE",
    "Choice",
    "explicit_warmup",
    "fitted_epochs",
    "format_settings",
    "keep_recorded",
    "runtime_rows",
]

#: A warm-up given in epochs is capped at this share of the run, so the decay takes place.
MAX_GIVEN_WARMUP_SHARE = 0.5


class Choice(NamedTuple):
    """A resolved setting: ``value`` and ``source`` (the option that gave it, or the rule
    that chose it). A tuple, so ``value, source = choice`` works."""

    value: Any
    source: str

    def __str__(self) -> str:
        return f"{self.value} ({self.source})"


def keep_recorded(
    choices: Mapping[str, Choice], recorded: Mapping[str, str] | None
) -> dict[str, Choice]:
    """``choices`` with the sources a resumed run recorded: the values were restored from its
    recipe, and where they first came from is what the table should say."""
    recorded = recorded or {}
    return {name: Choice(c.value, recorded.get(name, c.source)) for name, c in choices.items()}


def explicit_warmup(
    steps: int | None, epochs: float | None, steps_per_epoch: int, total_steps: int
) -> Choice | None:
    """The warm-up of ``--warmup-steps`` or ``--warmup-epochs``, None when neither was given.

    Steps are used as given, and refused unless shorter than the run (the lr would never
    decay); epochs are capped at :data:`MAX_GIVEN_WARMUP_SHARE` of the run.
    """
    if steps is not None:
        if steps >= total_steps > 0:
            raise OptionError(
                f"--warmup-steps {steps} is not shorter than the run's {total_steps} optimizer "
                "steps, so the learning rate would never decay; lower it or leave it out"
            )
        return Choice(steps, "--warmup-steps")
    if epochs is None:
        return None
    capped = warmup_steps(epochs, steps_per_epoch, total_steps, MAX_GIVEN_WARMUP_SHARE)
    source = f"--warmup-epochs {epochs:g}"
    if capped < round(epochs * steps_per_epoch):
        source += f", capped at {MAX_GIVEN_WARMUP_SHARE:.0%} of the run"
    return Choice(capped, source)


def fitted_epochs(
    given: int | None,
    steps_per_epoch: int,
    *,
    default: int,
    min_steps: int,
    max_epochs: int | None = None,
    texts: tuple[str, str],
) -> Choice:
    """Epochs: ``given`` (``--epochs``), else ``default``, or on small data as many as give
    ``min_steps`` optimizer steps (at most ``max_epochs``).

    ``texts``: the sources of the two defaults, the second formatted with ``default``,
    ``default_steps`` (the steps ``default`` epochs would take), ``min_steps`` and
    ``max_epochs``.
    """
    if given is not None:
        return Choice(given, "--epochs")
    needed = math.ceil(min_steps / steps_per_epoch)
    if needed <= default:
        return Choice(default, texts[0])
    epochs = needed if max_epochs is None else min(max_epochs, needed)
    why = texts[1].format(
        default=default,
        default_steps=default * steps_per_epoch,
        min_steps=min_steps,
        max_epochs=max_epochs,
    )
    return Choice(epochs, why)


def runtime_rows(device: object, processes: int, threads: int, out: str) -> list[tuple[str, str]]:
    """The table's rows for where and how the run executes."""
    return [
        ("device", f"{device}, {processes} process(es) x {threads} threads"),
        ("out", str(out)),
    ]


def format_settings(rows: Sequence[tuple[str, object]]) -> str:
    """``settings:`` and one aligned ``name  value`` line per row."""
    width = max(len(name) for name, _ in rows)
    return "settings:\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
