"""The one metrics-file schema written by every stage and read by the results tables.

``results/<run>/<model>/<stage>/metrics.json``::

    {"schema": "ibot-metrics/1", "run", "model", "stage", "task", "dataset", "protocol",
     "metrics": {name: number}, "checkpoint": {"path", "sha256"} | null, "config": {...},
     "wall_time_s", "software": {package: version}, "created", "host", "extra": {...}}

``metrics`` holds only scalars (the table values); anything larger (curves, per-head results)
goes to ``extra`` or a sibling file.
"""

from __future__ import annotations

import json
import math
import platform
import socket
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from ibot.io import write_json_atomic

__all__ = ["SCHEMA", "REQUIRED_FIELDS", "write_metrics", "read_metrics",
           "software_versions"]

SCHEMA = "ibot-metrics/1"
REQUIRED_FIELDS = ("schema", "run", "model", "stage", "task", "dataset", "protocol", "metrics",
                   "checkpoint", "config", "wall_time_s", "software")
_PACKAGES = ("torch", "torchvision", "timm", "mmengine", "mmcv", "mmdet", "mmsegmentation", "numpy",
             "submitit", "snakemake", "ibot-repro")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_metrics(path: str | Path, *, run: str, model: str, stage: str, task: str, dataset: str,
                  protocol: str, metrics: Mapping[str, float], config: Mapping[str, Any],
                  wall_time_s: float, checkpoint: str | Path | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate and atomically write one stage's metrics file; returns the record."""
    from ibot.checkpoint import sha256_file

    values = {}
    for name, value in metrics.items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r} of stage {stage!r} is not finite: {value}")
        values[name] = value
    record = {
        "schema": SCHEMA, "run": run, "model": model, "stage": stage, "task": task, "dataset": dataset,
        "protocol": protocol, "metrics": values,
        "checkpoint": None if checkpoint is None else {"path": str(checkpoint), "sha256": sha256_file(checkpoint)},
        "config": dict(config), "wall_time_s": round(float(wall_time_s), 3), "software": software_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
        "extra": dict(extra or {}),
    }
    write_json_atomic(record, path)
    return record


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read a metrics file and check it against the schema (clear error naming the file)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"metrics file {path}: unreadable: {error}") from error
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing or record.get("schema") != SCHEMA:
        raise ValueError(f"metrics file {path}: not a {SCHEMA} record (missing fields {missing}, "
                         f"schema {record.get('schema')!r})")
    return record
