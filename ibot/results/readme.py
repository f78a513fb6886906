"""README figures of a run, written from its results between markers (``<!-- NAME:start -->`` ...
``<!-- NAME:end -->``), so no number in the README is typed by hand or outlives the run it came from.

``python -m ibot.results readme --run-dir results/embedded --readme README.md`` writes, from the run's
``summary.csv`` (every stage's metrics.json) and its metrics files: one row per metric the paper tables
report (``results/reference/metric_map.csv``, in its order), one column per model (value and 95 %
interval), the trivial baseline; and where the numbers come from (the device and precision recorded in
the metrics files, the date, the stage jobs' span).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pandas as pd

from ibot.io import write_text_atomic
from ibot.stages import BACKBONE_STAGE

__all__ = ["replace_block", "run_figures", "write_readme_block"]


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between its ``<!-- name:start -->`` / ``<!-- name:end -->`` markers replaced."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {start} ... {end} block to fill")
    return pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text, count=1)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("*/*/metrics.json"))]


def _provenance(run_dir: Path, records: list[dict]) -> str:
    """Device, precision, date and the span of the stage jobs (first start to last record)."""
    def device(info: dict) -> str:
        bf16 = "native bf16" if info.get("bf16_native") else "no native bf16"
        return f"{info.get('name')} ({bf16})" if info.get("type") == "cpu" else str(info.get("name"))

    devices = sorted({device(r["device"]) for r in records if r.get("device")})
    precisions = sorted({str((r.get("extra") or {}).get("summary", {}).get("precision"))
                         for r in records if r["stage"] == BACKBONE_STAGE.name})
    ends = [datetime.fromisoformat(r["created"]) for r in records if r.get("created")]
    starts = [datetime.fromisoformat(r["created"]).timestamp() - float(r["wall_time_s"]) for r in records
              if r.get("created")]
    span = (max(ends).timestamp() - min(starts)) / 60 if ends else float("nan")
    return (f"Measured by `snakemake` (run `{run_dir.name}`, {len(records)} metrics files) on "
            f"{', '.join(devices) or 'an unrecorded device'}; pretraining precision {', '.join(precisions) or 'n/a'}; "
            f"{max(ends).date() if ends else 'n/a'}; stage jobs span {span:.1f} min (first start to last record).")


def _value(row: pd.Series | None) -> str:
    """``56.5 [49.6, 63.2]``: the value and its 95 % interval (empty when the model has no such row)."""
    if row is None or pd.isna(row["value"]):
        return ""
    interval = "" if pd.isna(row["ci_low"]) else f" [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"
    return f"{row['value']:.1f}{interval}"


def run_figures(run_dir: str | Path) -> str:
    """The Markdown block of a run: the paper-table metrics per model with their 95 % intervals and the
    trivial baseline of each (the first model's: it depends on the evaluation items only, except the
    shuffled-clusters baseline, which keeps that model's cluster sizes), then their provenance."""
    run_dir = Path(run_dir)
    summary = pd.read_csv(run_dir / "summary.csv")
    mapped = summary[summary["column"].notna()].copy()
    mapped["row"] = mapped["group"] + ": " + mapped["column"] + " (" + mapped["stage"] + ")"
    models = list(dict.fromkeys(mapped["model"]))
    lines = ["| metric (stage) | " + " | ".join(f"`{m}` [95 % interval]" for m in models)
             + " | trivial baseline | baseline kind |", "|:--|" + "--:|" * (len(models) + 1) + ":--|"]
    for label, rows in mapped.groupby("row", sort=False):
        by_model = {r["model"]: r for _, r in rows.iterrows()}
        with_baseline = rows[rows["baseline"].notna()]
        base = with_baseline.iloc[0] if len(with_baseline) else None
        cells = [_value(by_model.get(m)) for m in models]
        cells += ["", ""] if base is None else [f"{base['baseline']:.1f}", str(base["baseline_kind"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    records = _records(run_dir)
    return "\n".join(lines) + "\n\n" + _evidence(summary, records) + _provenance(run_dir, records)


def _evidence(summary: pd.DataFrame, records: list[dict]) -> str:
    """The two checks of :mod:`ibot.results.evidence` in two sentences: the first model with weights
    against its baselines, and against the first random-init model (no checkpoint in any of its
    records) when the run has one."""
    from ibot.results.evidence import baseline_checks, random_init_checks

    models = list(dict.fromkeys(summary["model"]))
    with_weights = {r["model"] for r in records if r.get("checkpoint")}
    random = [m for m in models if m not in with_weights]
    pretrained = [m for m in models if m in with_weights]
    if not pretrained:
        return ""
    checks = baseline_checks(summary, pretrained[0])
    below = [f"{r.stage} {r.metric}" for r in checks.itertuples() if not r.above]
    text = (f"Beyond its trivial baseline with its 95 % interval: {int(checks['above'].sum())} of {len(checks)} "
            f"numbers of `{pretrained[0]}`" + (f" (not: {', '.join(below)})" if below else "") + ". ")
    if random:
        versus = random_init_checks(summary, pretrained[0], random[0])
        by_family = versus.groupby("family", sort=False)["beats"].all()
        won, lost = [f for f, ok in by_family.items() if ok], [f for f, ok in by_family.items() if not ok]
        text += (f"Pretraining beats random init (`{random[0]}` below the 95 % interval) in {len(won)} of "
                 f"{len(by_family)} families: {', '.join(won) or 'none'}"
                 + (f"; not in {', '.join(lost)}" if lost else "") + ".")
    return text + "\n\n"


def write_readme_block(run_dir: str | Path, readme: str | Path, name: str | None = None) -> str:
    """Fill the README's block named after the run (or ``name``) with :func:`run_figures`; returns it."""
    readme, body = Path(readme), run_figures(run_dir)
    write_text_atomic(readme, replace_block(readme.read_text(), name or Path(run_dir).name, body))
    return body
