"""Live TensorBoard scalars of a training stage, exact across kills and resumes (main process only).

Every training stage writes its curves to ``<stage dir>/tb/`` (``tensorboard --logdir results/<run>``)
through :class:`ScalarWriter`: one event file per attempt, flushed at every ``add`` (a log step), so
the curves are live while a run lasts days.

A requeued or killed run resumes from its last checkpoint at some global step ``R``; the killed
attempt may already have written steps ``>= R``, which the resumed attempt writes again.
TensorBoard shows both copies when two event files hold the same step, so a writer opened with
``resume_step=R`` first rewrites the earlier attempts' events: those with step ``< R`` are copied,
verbatim (wall times included), into the new attempt's event file, and the earlier files are moved to
``tb/.superseded/<UTC time>/`` (never deleted; renamed ``events.out.superseded.*`` so TensorBoard does
not show them as a run). The same rule as ``train_log.jsonl`` (rows of re-run epochs dropped on
resume). Without anything to drop, earlier files stay where they are and a new file is added.

Order of the rewrite: the new file is written and flushed before the old ones move, so a kill in
between leaves exact copies (same tag, step and wall time), which the next start de-duplicates
(per tag and step, the latest wall time wins); nothing is lost.

Writing never stops training: an ``OSError`` (disk full, quota, a vanished mount) is reported in one
log line and the writer turns itself off. Anything else (a value that is not a number) raises.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ibot import distributed as dist_utils

__all__ = ["SUPERSEDED_DIR", "ScalarWriter", "event_files", "read_scalars"]

#: Where event files of earlier attempts go (inside the log dir).
SUPERSEDED_DIR = ".superseded"
_FILE_VERSION = "brain.Event:2"
_counter = itertools.count()


def event_files(log_dir: str | Path) -> list[Path]:
    """TensorBoard event files directly in ``log_dir`` (TensorBoard's rule: ``tfevents`` in the name)."""
    folder = Path(log_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if "tfevents" in p.name and p.is_file())


def _events(path: Path) -> Iterable[Any]:
    """Event protos of one file; a record torn by a kill ends the file (TensorBoard's loader rule)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    return LegacyEventFileLoader(str(path)).Load()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``log_dir``: tag -> [(step, value)] in file order, duplicates
    kept (what a reader of the folder sees; for tests and checks)."""
    from tensorboard.util import tensor_util

    out: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(log_dir):
        for event in _events(path):
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                number = value.simple_value if kind == "simple_value" else (
                    float(tensor_util.make_ndarray(value.tensor)) if kind == "tensor" else None)
                if number is not None:
                    out.setdefault(value.tag, []).append((int(event.step), float(number)))
    return out


class ScalarWriter:
    """Scalars of one stage in ``log_dir`` (TensorBoard event files), rank 0 only.

    ``resume_step``: the global step this attempt starts at (events of earlier attempts with a step
    ``>= resume_step`` are superseded, see the module docstring); ``None`` appends without dropping
    anything (a run that did not resume from a step). ``add(scalars, step)`` writes and flushes.
    On other ranks, or with ``log_dir=None``, every method is a no-op and nothing is read or created.
    """

    def __init__(self, log_dir: str | Path | None, resume_step: int | None = None, *,
                 enabled: bool | None = None) -> None:
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.resume_step = resume_step
        self.enabled = (dist_utils.is_main() if enabled is None else bool(enabled)) and log_dir is not None
        self.path: Path | None = None
        self._file = None
        self._records = None
        if self.enabled:
            self._guard(self._supersede)

    # -- writing ----------------------------------------------------------------------------------
    def add(self, scalars: Mapping[str, float], step: int, *, wall_time: float | None = None) -> None:
        """Write ``{tag: value}`` at global ``step`` and flush (values must be real numbers)."""
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=str(tag), simple_value=float(value)) for tag, value in scalars.items()]
        event = Event(wall_time=time.time() if wall_time is None else wall_time, step=int(step),
                      summary=Summary(value=values))
        self._guard(lambda: (self._write(event), self._flush()))

    def flush(self) -> None:
        if self.enabled and self._file is not None:
            self._guard(self._flush)

    def close(self) -> None:
        """Flush and close this attempt's file (a later ``add`` opens a new one, appending)."""
        if self._file is not None:
            file, self._file, self._records = self._file, None, None
            try:
                file.close()
            except OSError as error:
                self._disable(error)
        self.resume_step = None  # whatever this attempt wrote is current: never supersede it

    def __enter__(self) -> "ScalarWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _guard(self, action) -> None:
        try:
            action()
        except OSError as error:
            self._disable(error)

    def _disable(self, error: OSError) -> None:
        file, self._file, self._records, self.enabled = self._file, None, None, False
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # already reported below: the first error is the one that matters
        print(f"[tensorboard] writing to {self.log_dir} failed ({type(error).__name__}: {error}); "
              "TensorBoard curves of this run stop here, training goes on", file=sys.stderr, flush=True)

    def _open(self) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        while True:  # a fresh name (never append to an earlier attempt's file)
            path = self.log_dir / f"{stem}.{next(_counter)}"
            try:
                self._file = open(path, "xb")
                break
            except FileExistsError:
                continue
        self.path = path
        self._records = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), file_version=_FILE_VERSION))

    def _write(self, event) -> None:
        if self._file is None:
            self._open()
        self._records.write(event.SerializeToString())

    def _flush(self) -> None:
        self._file.flush()

    def _supersede(self) -> None:
        """Rewrite earlier attempts' events without the steps this attempt redoes (and without
        duplicates); move their files aside. Nothing to drop: leave them as they are."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        old = event_files(self.log_dir)
        if not old:
            return
        kept: dict[tuple[str, int], Any] = {}
        dropped = duplicates = 0
        for path in old:
            for event in _events(path):
                if not event.HasField("summary"):
                    continue  # file_version (the new file has its own), session logs
                if self.resume_step is not None and event.step >= self.resume_step:
                    dropped += len(event.summary.value)
                    continue
                for value in event.summary.value:
                    key = (value.tag, int(event.step))
                    single = Event(wall_time=event.wall_time, step=event.step, summary=Summary(value=[value]))
                    if key in kept:
                        duplicates += 1
                        if kept[key].wall_time > event.wall_time:
                            continue
                    kept[key] = single
        if not dropped and not duplicates:
            return
        for event in sorted(kept.values(), key=lambda e: (e.step, e.wall_time)):
            self._write(event)
        if self._file is None:
            self._open()  # nothing kept: still this attempt's file, before the old ones move
        self._flush()
        aside = self.log_dir / SUPERSEDED_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside.mkdir(parents=True, exist_ok=True)
        for path in old:
            os.replace(path, aside / path.name.replace("tfevents", "superseded"))
        print(f"[tensorboard] {self.log_dir}: resuming at step {self.resume_step}; kept {len(kept)} scalars of "
              f"earlier attempts, dropped {dropped} redone and {duplicates} duplicated; {len(old)} earlier event "
              f"file(s) moved to {aside}", flush=True)
