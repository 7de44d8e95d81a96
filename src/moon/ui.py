"""Console output shared by every stage: progress bars with a rate, tables, and `--quiet`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)  # progress and logs go to stderr; results (tables, config) to stdout
# Results piped to a file or a CI log keep their table rows whole instead of wrapping at
# the 80 columns assumed off a terminal; COLUMNS still sets the width when given.
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 132)
_quiet = False

# What a library function takes to report work done (`advance(n)`) to the bar its caller draws.
Advance = Callable[[int], object]


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


class _Rate(ProgressColumn):
    """Units per second, e.g. '3,412 items/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.completed / task.elapsed if task.elapsed else None  # whole-run average
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}/s", style="cyan")


@contextmanager
def progress(description: str, total: int | None, unit: str = "items") -> Iterator[callable]:
    """A progress bar; yields `advance(n)`. Silent under --quiet."""
    if _quiet:
        yield lambda n=1: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def log(message: str) -> None:
    if not _quiet:
        console.print(message)


def print_table(title: str, rows: list[tuple], columns: tuple[str, ...] = ("", "")) -> None:
    """Prints a result table to stdout (shown under --quiet too: it is the command's output)."""
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        numeric = all(isinstance(row[i], (int, float)) for row in rows)
        table.add_column(name, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    out.print(table)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
