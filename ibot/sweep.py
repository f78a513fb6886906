"""Hyper-parameter sweeps of a stage: one job per value, the best one reported, every run kept.

A stage with a registry ``sweep = (list_key, value_key)`` (fine-tuning: ``("lrs", "lr")``; the
official README "sweep[s] the learning rate" without giving the values) runs, for each value of
``<section>.<list_key>`` (null: the single ``<value_key>``), its own job writing
``<stage>/sweep/<value_key>_<value>/metrics.json`` with its own resumable work directory. This module
then writes ``<stage>/metrics.json``: the record of the best run on ``metric`` (its metrics, config,
protocol and checkpoint), with every run's value in ``extra.sweep``. Nothing of a run is moved or
deleted; runs of another checkpoint, dataset or protocol are refused rather than compared.

``python -m ibot.sweep --key lr --metric top1 --runs A/metrics.json B/metrics.json --out metrics.json``
"""

from __future__ import annotations

import argparse
import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ibot.io import write_json_atomic
from ibot.metrics import read_metrics

__all__ = ["SWEEP_DIR", "value_label", "run_metrics_path", "sweep_values", "run_config", "select_best", "main"]

#: Sub-folder of the stage folder holding one folder per swept value (never read as a stage result).
SWEEP_DIR = "sweep"


def value_label(value: float) -> str:
    """Folder-safe, round-trip label of a swept value (``0.004``, ``5e-05``)."""
    return repr(float(value))


def run_metrics_path(stage_dir: str | Path, key: str, value: float) -> Path:
    return Path(stage_dir) / SWEEP_DIR / f"{key}_{value_label(value)}" / "metrics.json"


def sweep_values(config: Mapping[str, Any], list_key: str, value_key: str) -> list[float]:
    """The swept values of a resolved stage config: ``config[list_key]`` or ``[config[value_key]]``."""
    values = config.get(list_key)
    return [float(v) for v in values] if values else [float(config[value_key])]


def run_config(stage: Any, resolved: Mapping[str, Any], label: str | float) -> dict[str, Any]:
    """The config of one run of ``stage``'s sweep (the one place a swept value is expanded): the resolved
    stage config with the value set and the list dropped, so adding a value to the list never changes,
    hence never reruns, the other runs. ``label`` is a value or its :func:`value_label`."""
    list_key, value_key, _ = stage.sweep
    values = {value_label(v): v for v in sweep_values(resolved, list_key, value_key)}
    label = label if isinstance(label, str) else value_label(label)
    if label not in values:
        raise ValueError(f"{stage.name}: {value_key} {label} is not in {stage.config_path}.{list_key}")
    return {**resolved, list_key: None, value_key: values[label]}


def select_best(paths: Sequence[str | Path], key: str, metric: str, *, higher_is_better: bool = True
                ) -> dict[str, Any]:
    """The aggregated record of a sweep (see the module docstring)."""
    if not paths:
        raise ValueError("sweep: no run metrics given")
    records = [(Path(p), read_metrics(p)) for p in paths]
    first = records[0][1]
    identity = ("run", "model", "stage", "task", "dataset", "protocol")
    for path, record in records[1:]:
        differs = [f for f in identity if record[f] != first[f]]
        if (record.get("checkpoint") or {}).get("sha256") != (first.get("checkpoint") or {}).get("sha256"):
            differs.append("checkpoint")
        if differs:
            raise ValueError(f"sweep: {path} differs from {records[0][0]} in {differs}; runs of one sweep must share "
                             "them (rerun the stale runs)")
    results = []
    for path, record in records:
        if key not in record["config"]:
            raise ValueError(f"sweep: {path} has no config.{key}")
        results.append({key: record["config"][key], metric: record["metrics"].get(metric), "metrics_file": str(path)})
    scored = [(r[metric], i) for i, r in enumerate(results) if r[metric] is not None]
    if not scored:
        raise ValueError(f"sweep: no run has a value for {metric!r} ({[str(p) for p, _ in records]})")
    best_index = (max if higher_is_better else min)(scored)[1]
    best = copy.deepcopy(records[best_index][1])
    best["extra"] = {**(best.get("extra") or {}), "sweep": {
        "key": key, "metric": metric, "higher_is_better": higher_is_better, "best": results[best_index][key],
        "results": results}}
    best["wall_time_s"] = round(sum(float(r["wall_time_s"]) for _, r in records), 3)
    best["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return best


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m ibot.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", required=True, help="swept config key, e.g. lr")
    parser.add_argument("--metric", required=True, help="metric that picks the best run, e.g. top1")
    parser.add_argument("--lower-is-better", action="store_true")
    parser.add_argument("--runs", nargs="+", required=True, help="metrics.json of every run of the sweep")
    parser.add_argument("--out", required=True, help="the stage's metrics.json")
    args = parser.parse_args(argv)
    record = select_best(args.runs, args.key, args.metric, higher_is_better=not args.lower_is_better)
    write_json_atomic(record, args.out)
    read_metrics(args.out)  # the written file is a valid record
    sweep = record["extra"]["sweep"]
    print(f"[sweep] best {args.key} = {sweep['best']} ({args.metric} "
          f"{record['metrics'].get(args.metric)}) of {len(sweep['results'])} runs -> {args.out}")
    return record


if __name__ == "__main__":
    main()
