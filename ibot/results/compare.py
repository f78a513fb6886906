"""Diff two runs (each one run or several seeds pooled), or a run against the paper.

A side is a comma-separated list of runs; each is a run name (``<results_dir>/<name>/summary.csv``),
a run folder, or a ``summary.csv`` path. A run folder without a summary is aggregated on the fly
(no paper join then unless ``models_info`` is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ibot.results.aggregate import aggregate, build_summary, find_metrics_files, read_summaries

__all__ = ["resolve_summary", "load_side", "compare_runs", "compare_paper", "format_comparison"]


def resolve_summary(spec: str | Path, results_dir: str | Path = "results",
                    models_info: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The summary of one run given by name, folder or summary.csv path."""
    path = Path(spec)
    candidates = [path] if path.suffix == ".csv" else [path / "summary.csv", Path(results_dir) / str(spec) / "summary.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return read_summaries([candidate])
    for folder in ([path] if path.is_dir() else []) + [Path(results_dir) / str(spec)]:
        if folder.is_dir():
            files = find_metrics_files(folder)
            if files:
                return build_summary(files, models_info)
    raise FileNotFoundError(f"run {spec!r}: no summary.csv and no metrics.json files "
                            f"(looked at {[str(c) for c in candidates]})")


def load_side(spec: str, results_dir: str | Path = "results",
              models_info: Mapping[str, Any] | None = None) -> pd.DataFrame:
    parts = [p for p in str(spec).split(",") if p]
    return pd.concat([resolve_summary(p, results_dir, models_info) for p in parts], ignore_index=True)


def _key(by: str) -> list[str]:
    if by not in ("model", "paper_model"):
        raise ValueError(f"--by must be 'model' or 'paper_model', got {by!r}")
    return [by, "stage", "metric"]


def _pool_keys(key: list[str]) -> list[str]:
    """``key`` plus dataset and protocol: runs are pooled only within one dataset and protocol."""
    return key[:2] + ["dataset", "protocol"] + key[2:]


def compare_runs(a: pd.DataFrame, b: pd.DataFrame, *, by: str = "model", labels: Sequence[str] = ("A", "B"),
                 only_common: bool = False) -> pd.DataFrame:
    """Per (model, stage, metric): mean/std/n of each side and ``delta = B − A`` (outer join).

    Each side is pooled per dataset and protocol (``protocol_A``/``protocol_B`` say which ran);
    ``same_protocol`` is false where the two sides ran different protocols or datasets.
    """
    key = _key(by)
    sides = []
    for frame, label in zip((a, b), labels):
        agg = aggregate(frame.dropna(subset=[key[0]]) if by == "paper_model" else frame, keys=_pool_keys(key))
        shown = ("dataset", "protocol", "mean", "std", "n", "runs")
        agg = agg[key + list(shown)].rename(columns={c: f"{c}_{label}" for c in shown})
        sides.append(agg)
    out = sides[0].merge(sides[1], on=key, how="inner" if only_common else "outer", sort=False)
    out["same_protocol"] = ((out[f"protocol_{labels[0]}"] == out[f"protocol_{labels[1]}"])
                            & (out[f"dataset_{labels[0]}"] == out[f"dataset_{labels[1]}"]))
    out["delta"] = out[f"mean_{labels[1]}"] - out[f"mean_{labels[0]}"]
    return out.reset_index(drop=True)


def compare_paper(a: pd.DataFrame, *, by: str = "model") -> pd.DataFrame:
    """Run (pooled) against the paper: only metrics the paper reports for the protocol and dataset
    that ran (``paper_protocols.csv``); ``delta = ours − paper``."""
    key = _pool_keys(_key(by))
    agg = aggregate(a, keys=key)
    agg = agg[pd.to_numeric(agg["paper_value"], errors="coerce").notna()]
    cols = key + (["paper_model"] if by == "model" else []) + ["column", "mean", "std", "n", "paper_value", "delta",
                                                               "paper_table", "runs"]
    return agg[[c for c in cols if c in agg.columns]].reset_index(drop=True)


def format_comparison(frame: pd.DataFrame, fmt: str = "md", digits: int = 2) -> str:
    """Markdown (default) or CSV text of a comparison frame; empty cells for missing values."""
    if fmt == "csv":
        return frame.to_csv(index=False, float_format=f"%.{digits + 2}f")
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = [("" if pd.isna(v) else f"{v:+.{digits}f}" if column == "delta" else f"{v:.{digits}f}")
                             for v in shown[column]]
        elif column.startswith("n_") or column == "n":
            shown[column] = ["" if pd.isna(v) else str(int(v)) for v in shown[column]]
        else:
            shown[column] = ["" if pd.isna(v) else str(v) for v in shown[column]]
    if shown.empty:
        return "| " + " | ".join(shown.columns) + " |\n|" + "|".join("---" for _ in shown.columns) + "|\n"
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"
