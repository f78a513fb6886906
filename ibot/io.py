"""Atomic file writes: the one temp-file-and-rename helper every output of the project goes through.

A reader (Snakemake, a resumed job, the results tables) never sees a half-written file: the data
goes to a uniquely named temp file in the target's folder (same filesystem, so the rename is
atomic), is flushed and fsynced, then renamed over the target. A failure or a kill leaves the
previous file intact; a killed writer may leave a ``.<name>.*.tmp`` file behind, never the target.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

__all__ = ["atomic_write", "write_text_atomic", "write_json_atomic", "write_csv_atomic", "temp_files_of"]


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` (``mode`` 'w' or 'wb'); on success it replaces ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode {mode!r}; expected 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": newline, "encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_files_of(path: str | Path) -> list[Path]:
    """Temp files :func:`atomic_write` may have left for ``path`` when its writer was killed."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(data: Any, path: str | Path) -> Path:
    """Indented, key-sorted JSON (non-JSON values via ``str``), written atomically."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    return Path(path)


def write_csv_atomic(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """CSV with header ``columns``; missing keys are empty cells, keys not in ``columns`` dropped."""
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
