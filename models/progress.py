"""A rich progress bar over the named steps of a long host job."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Steps:
    def __init__(self, names: list[str], enabled: bool = True):
        self._names = names
        self._done = -1
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(stderr=True), disable=not enabled)
        self._task = self._progress.add_task(names[0], total=len(names))

    def __enter__(self) -> Steps:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._progress.update(self._task, completed=len(self._names), description="Done")
        self._progress.__exit__(*exc)

    def next(self) -> None:
        self._done += 1
        self._progress.update(self._task, completed=self._done, description=self._names[self._done])


@contextmanager
def counting(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar over `total` items (invoices, chunks) on stderr, with the time left; yields advance(n)."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                        disable=not enabled)
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda n=1: progress.advance(task, n)
