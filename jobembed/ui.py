"""Progress output shared by every stage: one switch (the CLI's ``-q``) and rich bars with the same columns.

Stages take an explicit ``progress`` flag where they draw bars themselves; work that happens deep inside
a call (the one-time build of a builtin model, loading weights) asks ``progress_enabled()`` instead, so
``-q`` silences it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Turn every progress bar on or off (the CLI calls this once per command)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def progress_enabled() -> bool:
    return _ENABLED


class _RateColumn(ProgressColumn):
    """Items per second, once rich has measured a rate."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


def bar(*, enabled: bool = True, transient: bool = True) -> Progress:
    """A rich ``Progress`` with description, bar, done/total, rate, elapsed and remaining time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not (enabled and _ENABLED),
        transient=transient,
    )


@contextlib.contextmanager
def steps(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A bar over ``total`` named steps; yields ``advance(step_name)``."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not _ENABLED,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)

        def advance(step: str) -> None:
            progress.update(task, advance=1, description=f"{description}: {step}")

        yield advance


def note(message: str) -> None:
    """One progress line on stderr (``fold 2 of 3``), silenced with the bars."""
    if _ENABLED:
        from rich.console import Console

        Console(stderr=True).print(message, highlight=False)
