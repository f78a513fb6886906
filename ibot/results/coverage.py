"""Which of the paper's iBOT numbers a workflow config reproduces, and why the others are not.

Every iBOT row of ``results/reference/ibot_paper_results.csv`` (baselines such as ``DINO ViT-S/16``
are left out) is matched with the job that produces it: a line of ``metric_map.csv`` naming a
(stage, metric) for the row's task, dataset, protocol, metric and pretraining data (any of its
lines: the tables' and the ``coverage`` group's, for numbers the paper prints in several tables), a
model of the config whose ``paper_model`` is the row's model, and that model's
``<stage>/metrics.json`` **in the Snakemake plan of the config** (``snakemake --summary``): nothing
is claimed that the DAG does not run. A model reproduces a row only with the mapping lines of its
pretraining data (``models.<m>.pretrain_data``) and variant (``models.<m>.paper_variant``, the lines'
``variant``). A row without such a job gets the reason. A planned row lists the recipe values its job
runs with that no source readable offline confirms (``unverified``: :func:`ibot.config.unverified_values`).

``python -m ibot.results coverage [--configfile config/paper.yaml]``
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ibot.results.aggregate import REPO_ROOT, load_metric_map, load_reference

__all__ = ["COVERAGE_COLUMNS", "ibot_rows", "planned_outputs", "coverage", "format_coverage"]

COVERAGE_COLUMNS = ["table", "model", "pretrain_data", "task", "dataset", "protocol", "metric", "value", "job",
                    "unverified", "reason"]
_ROW_KEY = ("task", "dataset", "protocol", "metric", "pretrain_data")
_MAP_KEY = ("paper_task", "paper_dataset", "paper_protocol", "paper_metric", "paper_pretrain_data")
#: Paper tasks no stage of the registry evaluates yet, with where they are planned.
_MISSING_TASKS: dict[str, str] = {}


def ibot_rows(reference: pd.DataFrame) -> pd.DataFrame:
    """The reference rows of iBOT models (baseline rows carry their method as a prefix)."""
    return reference[~reference["model"].str.match(r"^(DINO|MoCo|BEiT|MAE|SwAV|Sup)\b")].reset_index(drop=True)


def planned_outputs(configfiles: Sequence[str | Path] = (), *, snakefile: str | Path = REPO_ROOT / "Snakefile",
                    cwd: str | Path = REPO_ROOT) -> set[str]:
    """Every output file of the Snakemake plan of ``configfiles`` (``snakemake --summary``)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--summary", "--cores", "1"]
    if configfiles:
        command += ["--configfile", *map(str, configfiles)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"snakemake --summary failed:\n{result.stderr[-3000:]}")
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    return {fields[0] for fields in lines[1:] if fields and fields[0]}


def _identity(entry: Mapping[str, Any]) -> tuple[str | None, str, str]:
    """(paper model, pretraining data, variant) of a config model entry."""
    return entry.get("paper_model"), entry.get("pretrain_data") or "IN-1K", entry.get("paper_variant") or ""


def _reason_without_mapping(row: Any) -> str:
    if row.task in _MISSING_TASKS:
        return _MISSING_TASKS[row.task]
    return "no stage maps to this row (results/reference/metric_map.csv)"


def _no_model_reason(row: Any, variants: set[str]) -> str:
    """Why no model of the config can produce the row (its paper model, data or variant is missing)."""
    needs = [f"paper_model {row.model!r}"]
    if row.pretrain_data != "IN-1K":
        needs.append(f"pretrain_data {row.pretrain_data}")
    needs += [f"paper_variant {v!r}" for v in sorted(variants) if v]
    return f"no model with {' and '.join(needs)} in this config"


def _not_run_reason(stages: list[str], ours: list[str], config: Mapping[str, Any]) -> str:
    reason = f"{', '.join(ours)} does not run {', '.join(stages)} in this config"
    unsupported = [f"{m}: {why}" for m in ours for s in stages
                   if (why := (config["models"][m].get("unsupported_stages") or {}).get(s))]
    return reason + (f" ({'; '.join(unsupported)})" if unsupported else "")


def coverage(config: Mapping[str, Any], planned: Iterable[str], *, reference: pd.DataFrame | None = None,
             metric_map: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per iBOT reference number: the planned ``metrics.json`` producing it, or the reason."""
    reference = load_reference() if reference is None else reference
    metric_map = load_metric_map() if metric_map is None else metric_map
    planned = set(planned)
    lines = metric_map[metric_map["paper_table"] != ""]
    by_key: dict[tuple, list[tuple[str, str, str]]] = {}
    for line in lines.itertuples(index=False):
        key = tuple(str(getattr(line, k)) for k in _MAP_KEY)
        producer = (line.stage, line.metric, line.variant)
        if producer not in by_key.setdefault(key, []):  # several tables print one number
            by_key[key].append(producer)
    from ibot.config import unverified_values

    identities = {name: _identity(entry) for name, entry in config["models"].items()}
    root = f"{config['results_dir']}/{config['run']}"
    out = []
    for row in ibot_rows(reference).itertuples(index=False):
        producers = by_key.get(tuple(str(getattr(row, k)) for k in _ROW_KEY), [])
        ours = [(name, stage, metric) for name, (paper_model, data, variant) in identities.items()
                if paper_model == row.model and data == row.pretrain_data
                for stage, metric, line_variant in producers if line_variant == variant]
        job, unverified = "", ""
        if not producers:
            reason = _reason_without_mapping(row)
        elif not ours:
            reason = _no_model_reason(row, {variant for _, _, variant in producers})
        else:
            jobs = [(model, stage, metric) for model, stage, metric in ours
                    if f"{root}/{model}/{stage}/metrics.json" in planned]
            job = "; ".join(f"{root}/{model}/{stage}/metrics.json ({metric})" for model, stage, metric in jobs)
            unverified = ", ".join(sorted({key for model, stage, _ in jobs
                                           for key in unverified_values(config, model, stage)}))
            reason = "" if job else _not_run_reason(sorted({s for _, s, _ in ours}),
                                                     list(dict.fromkeys(m for m, _, _ in ours)), config)
        out.append({**{c: getattr(row, c) for c in COVERAGE_COLUMNS if c not in ("job", "unverified", "reason")},
                    "job": job, "unverified": unverified, "reason": reason})
    return pd.DataFrame(out, columns=COVERAGE_COLUMNS)


def format_coverage(frame: pd.DataFrame, configfiles: Sequence[str | Path] = ()) -> str:
    """Markdown: the covered fraction, the uncovered rows grouped by reason, then every row."""
    planned = frame["job"] != ""
    covered = int(planned.sum())
    unverified = planned & (frame["unverified"] != "")
    source = ", ".join(map(str, configfiles)) or "config/config.yaml"
    text = [f"# Paper coverage of {source}", "",
            f"**{covered} of {len(frame)} iBOT numbers of results/reference/ ({100 * covered / max(len(frame), 1):.0f}%)"
            f" are produced by a planned job: {covered - int(unverified.sum())} with every recipe value cited, "
            f"{int(unverified.sum())} with unverified values.**"]
    if (~planned).any():
        text += ["", "| not covered because | rows |", "|---|---|"]
        text += [f"| {reason} | {count} |" for reason, count in frame[~planned]["reason"].value_counts().items()]
    text += ["", "| planned with unverified recipe values (`ibot.config explain` says what verifies each) | rows |",
             "|---|---|"]
    for keys, count in frame[unverified]["unverified"].value_counts().items():
        text.append(f"| {keys} | {count} |")
    text += ["", "| table | model | task | dataset | protocol | metric | paper | job or reason |", "|---|---|---|---|---|---|---|---|"]
    for row in frame.itertuples(index=False):
        mark = f" (unverified: {row.unverified})" if row.unverified else ""
        text.append(f"| {row.table} | {row.model} | {row.task} | {row.dataset} | {row.protocol} | {row.metric} | "
                    f"{row.value} | {row.job or row.reason}{mark} |")
    return "\n".join(text) + "\n"
