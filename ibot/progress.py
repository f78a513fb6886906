"""Progress with ETA for long loops: a live bar on a terminal, plain periodic lines in log files.

Snakemake and the launcher send a stage's stdout/stderr to log files, where a carriage-return bar
would be one endless line; so :class:`Progress` draws a tqdm bar only when its stream is a terminal
and otherwise prints one line at most every ``interval_s`` seconds and a last one at the end::

    [linear epoch 3/100] 120/500 (24%) 39s elapsed, 3.08 it/s, eta 2m03s

Only the main process reports (the others run the same loop silently).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

from ibot.distributed import is_main

__all__ = ["Progress", "progress", "format_duration"]

T = TypeVar("T")

#: Seconds between two progress lines in a log file.
DEFAULT_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """``45s``, ``2m03s``, ``1h02m`` (coarse on purpose: for ETAs and elapsed times in logs)."""
    seconds = int(max(0.0, seconds) + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """Count the steps of one loop of ``total`` steps (``None``: unknown) and report them.

    ``update(n)`` after each step; ``close()`` (or the ``with`` block's end) prints the final line.
    ``stream`` defaults to ``sys.stderr``; ``enabled`` defaults to "this is the main process".
    """

    def __init__(self, total: int | None, desc: str, *, interval_s: float = DEFAULT_INTERVAL_S,
                 stream: IO[str] | None = None, enabled: bool | None = None) -> None:
        self.total, self.desc, self.interval_s = total, desc, float(interval_s)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = is_main() if enabled is None else bool(enabled)
        self.done = 0
        self.start = self._last_line = time.monotonic()
        self._reported = -1  # the count of the last line printed
        self._closed = False
        self._bar = None
        if self.enabled and _is_terminal(self.stream):
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval_s:
            self._line(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done != self._reported:
            self._line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self, now: float | None = None) -> str:
        """The progress line for the current count (what a log file gets)."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            count = f"{self.done}/{self.total} ({100.0 * self.done / self.total:.0f}%)"
        else:
            count = f"{self.done} it"
        text = f"[{self.desc}] {count} {format_duration(elapsed)} elapsed, {rate:.2f} it/s"
        if self.total and self.done < self.total and rate > 0:
            text += f", eta {format_duration((self.total - self.done) / rate)}"
        elif self.total and self.done >= self.total:
            text += ", done"
        return text

    def _line(self, now: float) -> None:
        self._last_line, self._reported = now, self.done
        print(self.line(now), file=self.stream, flush=True)


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, interval_s: float = DEFAULT_INTERVAL_S,
             stream: IO[str] | None = None) -> Iterator[T]:
    """Iterate over ``iterable`` reporting progress (see :class:`Progress`; ``total`` defaults to
    ``len(iterable)``; a loop left early reports where it stopped)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, interval_s=interval_s, stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update()
