"""Progress of long host jobs on stderr: rich bars on a terminal; piped (a CI log, `2>build.log`), one plain
line per stage and per tenth of a count instead, since bars redrawn with \\r are unreadable in a file. Also
keeps libraries' own chatter out: transformers' tqdm bars and onnxruntime's root-logger warnings."""

from __future__ import annotations

import logging
import os
import sys
import time
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

LIBRARY_CHATTER = ("onnxruntime", "onnx_ir", "optimum")  # whose root-logger warnings we drop (see quiet_libraries)


def on_terminal() -> bool:
    return Console(stderr=True).is_terminal


def _line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _bar(*extra) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), *extra, console=Console(stderr=True))


class Steps:
    """Named stages of one job (export, quantize, measure): a bar, or a line as each stage starts."""

    def __init__(self, names: list[str], enabled: bool = True):
        self._names = names
        self._done = -1
        self._enabled = enabled
        self._terminal = on_terminal()
        self._started = time.monotonic()
        self._progress = _bar()
        self._progress.disable = not (enabled and self._terminal)
        self._task = self._progress.add_task(names[0], total=len(names))

    def __enter__(self) -> Steps:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._progress.update(self._task, completed=len(self._names), description="Done")
            if self._enabled and not self._terminal:
                _line(f"done in {time.monotonic() - self._started:.0f} s")
        self._progress.__exit__(*exc)

    def next(self) -> None:
        self._done += 1
        name = self._names[self._done]
        self._progress.update(self._task, completed=self._done, description=name)
        if self._enabled and not self._terminal:
            _line(f"[{self._done + 1}/{len(self._names)}] {name}")


class _Lines:
    """A count printed as lines: at each tenth of the total, with the time left."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.done = description, total, 0
        self.started = time.monotonic()
        self.next_tenth = 1

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.total and self.done * 10 >= self.next_tenth * self.total:
            self.next_tenth = self.done * 10 // self.total + 1
            elapsed = time.monotonic() - self.started
            left = elapsed / self.done * (self.total - self.done)
            _line(f"{self.description}: {self.done}/{self.total}{note}, {elapsed:.0f} s, about {left:.0f} s left")


@contextmanager
def counting(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar over `total` items (invoices, chunks) on stderr, with the time left; yields advance(n)."""
    if not enabled:
        yield lambda n=1: None
    elif not on_terminal():
        lines = _Lines(description, total)
        yield lines.advance
    else:
        progress = _bar(TimeRemainingColumn())
        task = progress.add_task(description, total=total)
        with progress:
            yield lambda n=1: progress.advance(task, n)


@contextmanager
def training(steps: int, enabled: bool = True) -> Iterator[Callable[[float], None]]:
    """LoRA training: step, loss and time left; yields step_done(loss)."""
    if not enabled:
        yield lambda loss: None
    elif not on_terminal():
        lines = _Lines("LoRA step", steps)
        yield lambda loss: lines.advance(1, f", loss {loss:.3f}")
    else:
        progress = _bar(TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        task = progress.add_task("LoRA training", total=steps, loss="-")
        with progress:
            yield lambda loss: progress.update(task, advance=1, loss=f"{loss:.3f}")


class _DropLibraryWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f"/{name}/" in record.pathname.replace("\\", "/") for name in LIBRARY_CHATTER)


def quiet_libraries() -> None:
    """onnxruntime's quantizer warns through the root logger ("WARNING:root:Please consider to run
    pre-processing before quantization"), advice for image models, not for us. Piped, the tqdm bars of
    transformers (reading a GGUF) are off too: our own stages say what is happening. tqdm (4.66+) and
    huggingface_hub read these variables, so nothing is imported here (transformers costs seconds)."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropLibraryWarnings) for f in root.filters):
        root.addFilter(_DropLibraryWarnings())
    if not on_terminal():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
