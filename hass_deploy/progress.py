"""Progress bars for long work (data extraction, training, widening, the demo target, load tests): one look, on
stderr, with the work's own rate and an ETA; drawn only where someone watches a terminal.

rich is imported here and nowhere else for bars; it comes with typer, so it is always installed.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def progress_bar(title: str, *fields: str, enabled: bool = True) -> Progress:
    """A bar: `title`, the bar, done/total, one column per format in `fields` (over the task's fields, such as
    "{task.fields[rate]:.0f} tok/s"), elapsed time and ETA.

    It is disabled (draws nothing, and `bar.disable` says so) unless `enabled` and stderr is a terminal: logs,
    pipes and torchrun's other ranks get the caller's own lines instead of redrawn frames.
    """
    console = Console(stderr=True)
    return Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), *(TextColumn(f) for f in fields),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=not (enabled and console.is_terminal))
