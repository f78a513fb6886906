"""The one metrics-file schema written by every stage and read by the results tables.

``results/<run>/<model>/<stage>/metrics.json``::

    {"schema": "ibot-metrics/1", "run", "model", "stage", "task", "dataset", "protocol",
     "metrics": {name: number}, "checkpoint": {"path", "sha256"} | null, "config": {...},
     "wall_time_s", "software": {package: version}, "created", "host", "device", "extra": {...},
     "intervals": {name: {"low", "high", "method", "n", "confidence"}},
     "baselines": {name: {"value", "kind"}}}

``intervals`` and ``baselines`` (:mod:`ibot.uncertainty`) say what a number means on its data: its 95 %
interval over the evaluation items and what a model that learned nothing scores on the same items.

``metrics`` holds only scalars (the table values); anything larger (curves, per-head results)
goes to ``extra`` or a sibling file. A metric the evaluator did not produce is never a made-up number:
it is ``null`` and ``extra["null_reasons"][name]`` says why (e.g. mmdet's CocoMetric computes nothing
for a task without a single detection). NaN and infinities are refused.
"""

from __future__ import annotations

import json
import math
import platform
import socket
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ibot.io import write_json_atomic
from ibot.uncertainty import check_evidence

if TYPE_CHECKING:
    from ibot.checkpoint import BackboneCheckpoint

__all__ = ["SCHEMA", "REQUIRED_FIELDS", "NULL_REASONS", "write_metrics", "read_metrics", "check_metric_values",
           "software_versions", "device_info"]

SCHEMA = "ibot-metrics/1"
REQUIRED_FIELDS = ("schema", "run", "model", "stage", "task", "dataset", "protocol", "metrics",
                   "checkpoint", "config", "wall_time_s", "software")
#: ``extra`` key of the reasons of the ``null`` metrics.
NULL_REASONS = "null_reasons"
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


def device_info() -> dict[str, Any]:
    """What computed a record: the GPU's name, or the CPU's model and whether it has native bf16
    (AVX512-BF16 / AMX: embedded pretraining then runs in bf16, elsewhere in fp32)."""
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()}
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's entries
            key, _, value = (part.strip() for part in line.partition(":"))
            info.setdefault(key, value)
    except OSError:
        pass
    name, flags = info.get("model name") or platform.processor(), set(info.get("flags", "").split())
    return {"type": "cpu", "name": name, "threads": torch.get_num_threads(),
            "bf16_native": bool(flags & {"avx512_bf16", "amx_bf16"})}


def check_metric_values(metrics: Mapping[str, Any], null_reasons: Mapping[str, Any], where: str
                        ) -> dict[str, float | None]:
    """The metrics as floats, ``None`` kept; raises on NaN/inf, on a ``None`` without a reason and on a
    reason given for a metric that has a value (or for no metric at all)."""
    values: dict[str, float | None] = {}
    for name, value in metrics.items():
        if value is None:
            reason = null_reasons.get(name)
            if not isinstance(reason, str) or not reason.strip():
                raise ValueError(f"{where}: metric {name!r} is null without a reason "
                                 f"(pass null_reasons={{{name!r}: '<why the evaluator produced no value>'}})")
            values[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise ValueError(f"{where}: metric {name!r} is not a number: {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: metric {name!r} is not finite: {value}")
        values[name] = value
    stray = sorted(set(null_reasons) - {n for n, v in values.items() if v is None})
    if stray:
        raise ValueError(f"{where}: null reasons given for metrics that are not null: {stray}")
    return values


def write_metrics(path: str | Path, *, run: str, model: str, stage: str, task: str, dataset: str,
                  protocol: str, metrics: Mapping[str, float | None], config: Mapping[str, Any],
                  wall_time_s: float, checkpoint: BackboneCheckpoint | str | Path | None = None,
                  extra: Mapping[str, Any] | None = None,
                  null_reasons: Mapping[str, str] | None = None,
                  intervals: Mapping[str, Mapping[str, Any]] | None = None,
                  baselines: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Validate and atomically write one stage's metrics file; returns the record.

    A metric may be ``None`` (written as JSON ``null``) only with its reason in ``null_reasons``
    (stored as ``extra["null_reasons"]``); NaN and infinities are refused.

    The record names the checkpoint by its sha256 (a :class:`ibot.checkpoint.BackboneCheckpoint`
    gives the digest of the bytes the stage loaded), so it must be the file the stage computed from:
    a checkpoint modified after the stage started (``wall_time_s`` ago) is an error, not a record.
    Resumed work is tied to its checkpoint by the work directory's fingerprint (ibot.workdir).
    """
    from ibot.checkpoint import BackboneCheckpoint, sha256_file, weights_file

    weights = checkpoint.path if isinstance(checkpoint, BackboneCheckpoint) else checkpoint
    if weights is not None and weights_file(weights).stat().st_mtime > time.time() - float(wall_time_s):
        raise RuntimeError(f"stage {stage}: checkpoint {weights} was modified while the stage ran; its "
                           f"result would be paired with weights it was not computed from. Rerun the stage.")
    digest = None if weights is None else (checkpoint.sha256 if isinstance(checkpoint, BackboneCheckpoint)
                                            else sha256_file(weights_file(weights)))

    extra = dict(extra or {})
    if NULL_REASONS in extra:
        raise ValueError(f"stage {stage!r}: pass null reasons as null_reasons=, not in extra")
    null_reasons = dict(null_reasons or {})
    values = check_metric_values(metrics, null_reasons, f"stage {stage!r}")
    intervals, baselines = dict(intervals or {}), dict(baselines or {})
    check_evidence(values, intervals, baselines, f"stage {stage!r}")
    if null_reasons:
        extra[NULL_REASONS] = null_reasons
    record = {
        "schema": SCHEMA, "run": run, "model": model, "stage": stage, "task": task, "dataset": dataset,
        "protocol": protocol, "metrics": values,
        "checkpoint": None if weights is None else {"path": str(weights), "sha256": digest},
        "config": dict(config), "wall_time_s": round(float(wall_time_s), 3), "software": software_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
        "device": device_info(),
        "extra": extra, "intervals": intervals, "baselines": baselines,
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
    where = f"metrics file {path}"
    values = check_metric_values(record["metrics"], (record.get("extra") or {}).get(NULL_REASONS) or {}, where)
    check_evidence(values, record.get("intervals") or {}, record.get("baselines") or {}, where)
    return record
