"""The paper's ablation and analysis numbers: which job of a config reproduces each, and the tables.

``results/reference/ibot_paper_ablations.csv`` holds the 154 numbers (Tab. 9, 11, 17-20 and the App. B/C/E
studies); ``results/reference/ablation_settings.csv`` names each of its 78 settings (a table row: what the
row varies, for one method) and the setting its delta is taken against (``delta_vs``: the table's reference
row). A config model reproduces the settings it lists in ``models.<m>.ablation`` (``config/ablations.yaml``).

A reference row is produced by the model of its setting whose pretraining has the row's epochs (the 300- and
800-epoch columns of Tab. 19 are different models), through the stage of its task (:data:`TASK_STAGE`);
Tab. 19's hours to 100/300/800 epochs come from the longest run of the setting (the cumulative time it
records at those epochs) and its memory from the same run. A row whose model is left out of the plan for an
absent user-provided file (``skip_models_missing_files``) is planned but marked as needing that file. A row the
paper prints as a gain over another method (Fig. 5's part-wise probing: "gain over DINO ViT-S/16") is ours minus
the same metric of the model named by ``models.<m>.ablation_gain_over``.

``ibot coverage --configfile config/ablations.yaml`` reports these rows beside the main tables;
``ibot ablations --summary <run>/summary.csv`` writes the tables (rows = settings, columns as printed, ours
beside the paper's numbers and both deltas).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ibot.results.aggregate import REFERENCE_DIR

__all__ = ["ABLATIONS_CSV", "SETTINGS_CSV", "TASK_STAGE", "load_ablations", "load_settings", "row_job",
           "ablation_coverage", "format_ablation_coverage", "ablation_tables", "format_ablation_tables"]

ABLATIONS_CSV = REFERENCE_DIR / "ibot_paper_ablations.csv"
SETTINGS_CSV = REFERENCE_DIR / "ablation_settings.csv"

#: (task, reference metric) -> (stage, our metric); compute rows name the epochs they were reached at.
TASK_STAGE: dict[tuple[str, str], tuple[str, str]] = {
    ("knn", "top1"): ("knn", "top1_k20"),
    ("linear", "top1"): ("linear", "top1"),
    ("finetune", "top1"): ("finetune", "top1"),
    ("semantic_seg", "mIoU"): ("seg_linear", "mIoU"),
    ("compute", "gpu_mem"): ("pretrain", "peak_memory_gb"),
    ("compute", "train_time"): ("pretrain", "train_hours_{epochs}ep"),
    # Fig. 5: the mean of the top-k patch tokens (k read from the row's protocol), as a gain over DINO
    ("linear", "top1 gain over DINO ViT-S/16"): ("linear_part", "top1_k{topk}"),
}
_TOPK = re.compile(r"top-(\d+) patch token")
_GAIN = " gain over "
#: Column labels as the paper prints them.
_COLUMN = {"knn": "k-NN", "linear": "Lin.", "finetune": "Fin.", "semantic_seg": "mIoU"}


def _varies(note: str) -> str:
    return note.split(" | ")[0].removeprefix("varies: ")


def load_settings(path: str | Path = SETTINGS_CSV) -> pd.DataFrame:
    """The 78 settings (``setting, table, model, varies, delta_vs``), in the paper's order."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = ["setting", "table", "model", "varies", "delta_vs"]
    if list(frame.columns) != expected:
        raise ValueError(f"ablation settings {path}: columns {list(frame.columns)}, expected {expected}")
    duplicated = frame[frame["setting"].duplicated()]["setting"].tolist()
    unknown = sorted(set(frame["delta_vs"]) - set(frame["setting"]) - {""})
    if duplicated or unknown:
        raise ValueError(f"ablation settings {path}: duplicate settings {duplicated}, unknown delta_vs {unknown}")
    return frame


def load_ablations(path: str | Path = ABLATIONS_CSV, settings: pd.DataFrame | None = None) -> pd.DataFrame:
    """The reference ablation rows with their ``setting`` (every row has one) and ``epochs_n`` (int or None)."""
    from ibot.results.aggregate import load_reference

    rows = load_reference(path)
    settings = load_settings() if settings is None else settings
    rows["varies"] = rows["note"].map(_varies)
    rows = rows.merge(settings, on=["table", "model", "varies"], how="left", validate="many_to_one")
    if rows["setting"].isna().any():
        missing = rows[rows["setting"].isna()][["table", "model", "varies"]].drop_duplicates().values.tolist()
        raise ValueError(f"{path}: rows without a setting in {SETTINGS_CSV.name}: {missing}")
    rows["epochs_n"] = pd.Series([int(m.group(1)) if (m := re.match(r"(\d+)", e)) else None for e in rows["epochs"]],
                                 index=rows.index, dtype=object)
    return rows


def model_epochs(config: Mapping[str, Any], model: str) -> int | None:
    """Pretraining epochs of the backbone a model evaluates, as ablation rows are matched: ``paper_epochs``
    when set (a shrunken stand-in), else its own, or its ``weights_from`` model's."""
    from ibot.config import section_config

    entry = config["models"][model]
    if entry.get("paper_epochs"):
        return int(entry["paper_epochs"])
    source = entry.get("weights_from") or (model if entry["weights"] == "pretrain" else None)
    return int(section_config(config, "pretrain", source)["epochs"]) if source else None


def _select(row: Any, epochs: Mapping[str, int | None]) -> tuple[str, str, str] | str:
    """(model, stage, metric) of a reference row among the models of its setting (``{model: pretraining
    epochs}``), or why none: the model pretrained the row's epochs; for Tab. 19's hours, the longest run."""
    if not epochs:
        return f"no model of this config lists ablation setting {row.setting!r}"
    stage, metric = TASK_STAGE[(row.task, row.metric)]
    if row.task == "compute":  # the longest run of the setting records the time at every epoch mark
        reached = [m for m, e in epochs.items() if e and (row.epochs_n is None or e >= row.epochs_n)]
        if not reached:
            return f"no model of setting {row.setting!r} pretrains {row.epochs_n} epochs"
        return max(reached, key=lambda m: epochs[m]), stage, metric.format(epochs=row.epochs_n)
    matching = [m for m, e in epochs.items() if row.epochs_n is None or e == row.epochs_n]
    if not matching:
        return (f"no model of setting {row.setting!r} is pretrained {row.epochs_n} epochs "
                f"({', '.join(f'{m}: {e}' for m, e in epochs.items())})")
    if "{topk}" in metric:
        found = _TOPK.search(row.protocol)
        if not found:
            return f"the row's protocol names no top-k patch count: {row.protocol!r}"
        metric = metric.format(topk=found.group(1))
    return matching[0], stage, metric


def gain_baseline(row: Any, models: Mapping[str, Mapping[str, Any]], model: str) -> str | None:
    """The model whose metric a gain row subtracts (``models.<model>.ablation_gain_over``), ``""`` when the row
    is a gain but the model names none, ``None`` for a row that is not a gain."""
    if _GAIN not in row.metric:
        return None
    return str(models[model].get("ablation_gain_over") or "")


def row_job(row: Any, config: Mapping[str, Any]) -> tuple[str, str, str] | str:
    """(model, stage, metric) producing a reference row in ``config``, or why none does (the config's
    ``ablation_not_planned`` reason of the setting first)."""
    reason = (config.get("ablation_not_planned") or {}).get(row.setting)
    if (row.task, row.metric) not in TASK_STAGE:
        return str(reason or f"no stage computes {row.task} {row.metric!r}")
    models = [m for m, e in config["models"].items() if row.setting in (e.get("ablation") or [])]
    if not models and reason:
        return str(reason)
    return _select(row, {m: model_epochs(config, m) for m in models})


def ablation_coverage(config: Mapping[str, Any], planned: Iterable[str], *, skipped: Mapping[str, str] | None = None,
                      reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per reference ablation number: ``status`` planned / needs file / not planned, the job
    (``metrics.json (metric)``), the recipe values no offline source confirms, or the reason."""
    from ibot.config import planned_stages, unverified_values

    reference = load_ablations() if reference is None else reference
    planned, skipped = set(planned), dict(skipped or {})
    root = f"{config['results_dir']}/{config['run']}"
    out = []
    for row in reference.itertuples(index=False):
        found = row_job(row, config)
        job = status = unverified = reason = ""
        if isinstance(found, str):
            status, reason = "not planned", found
        else:
            model, stage, metric = found
            baseline = gain_baseline(row, config["models"], model)
            models = [model] + ([baseline] if baseline else [])
            targets = [f"{root}/{m}/{stage}/metrics.json" for m in models]
            missing_stage = [m for m in models if stage not in planned_stages(config, m)]
            if baseline == "":
                status, reason = "not planned", (f"the paper prints a {row.metric}: {model} needs "
                                                 f"ablation_gain_over (the model subtracted)")
            elif missing_stage:
                status, reason = "not planned", f"{', '.join(missing_stage)} does not run {stage}"
            elif any(m in skipped for m in models):
                status, job = "needs file", " - ".join(f"{t} ({metric})" for t in targets)
                reason = "; ".join(skipped[m] for m in models if m in skipped)
            elif all(t in planned for t in targets):
                status, job = "planned", " - ".join(f"{t} ({metric})" for t in targets)
            else:
                status, reason = "not planned", f"{', '.join(t for t in targets if t not in planned)} is not in the Snakemake plan"
            if job:
                unverified = ", ".join(sorted(unverified_values(config, model, stage)))
        out.append({"table": row.table, "setting": row.setting, "model": row.model, "epochs": row.epochs,
                    "task": row.task, "metric": row.metric, "value": row.value, "status": status, "job": job,
                    "unverified": unverified, "reason": reason})
    return pd.DataFrame(out)


def format_ablation_coverage(frame: pd.DataFrame, configfiles: Iterable[str | Path] = ()) -> str:
    """Markdown: the planned fraction, rows needing a user-provided file, the reasons, then every row."""
    source = ", ".join(map(str, configfiles)) or "config/config.yaml"
    planned = frame["status"] == "planned"
    needs = frame["status"] == "needs file"
    total = len(frame)
    text = [f"# Ablation coverage of {source}", "",
            f"**{int((planned | needs).sum())} of {total} ablation and analysis numbers of "
            f"results/reference/ibot_paper_ablations.csv ({100 * (planned | needs).sum() / max(total, 1):.0f}%) are "
            f"planned: {int(planned.sum())} by a job of the Snakemake plan, {int(needs.sum())} by jobs waiting for a "
            f"user-provided file absent here; {int((frame['status'] == 'not planned').sum())} not planned.**"]
    if needs.any():  # grouped by the absent file (the reasons name each model's key)
        files = frame[needs]["reason"].str.extract(r"(\S+) \(absent\)", expand=False).fillna(frame[needs]["reason"])
        text += ["", "| needs this user-provided file (absent here) | rows |", "|---|---|"]
        text += [f"| {path} | {count} |" for path, count in files.value_counts().items()]
    if (frame["status"] == "not planned").any():
        text += ["", "| not planned because | rows |", "|---|---|"]
        text += [f"| {reason} | {count} |"
                 for reason, count in frame[frame["status"] == "not planned"]["reason"].value_counts().items()]
    text += ["", "| table | setting | model | epochs | task | metric | paper | status | job or reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in frame.itertuples(index=False):
        mark = f" (unverified: {row.unverified})" if row.unverified else ""
        detail = row.job + (f"; {row.reason}" if row.job and row.reason else "") if row.job else row.reason
        text.append(f"| {row.table} | {row.setting} | {row.model} | {row.epochs} | {row.task} | {row.metric} | "
                    f"{row.value:g} | {row.status} | {detail}{mark} |")
    return "\n".join(text) + "\n"


# -- tables -------------------------------------------------------------------------------------------------
def _column(row: Any, multi_epoch: bool) -> str:
    """The printed column of a row: ``k-NN``, ``Lin.``/``Lin.300``, ``Fin.``, ``T100``, ``Mem. (GB)``, ``mIoU``."""
    if row.task == "compute":
        return "Mem. (GB)" if row.metric == "gpu_mem" else f"T{row.epochs_n}"
    label = _COLUMN.get(row.task, f"{row.task} {row.metric}")
    if _GAIN in row.metric:  # Fig. 5: "Lin. gain over DINO ViT-S/16"
        label += _GAIN + row.metric.split(_GAIN, 1)[1]
    return f"{label}{row.epochs_n}" if multi_epoch and row.epochs_n else label


def ablation_tables(summary: pd.DataFrame, models: Mapping[str, Mapping[str, Any]], *,
                    reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long table of every reference row with ours: ``table, setting, model (paper's), column, paper, ours,
    ci_low, ci_high, our_model, delta_paper, delta_ours`` (deltas against the setting's ``delta_vs`` row of the
    same column). ``summary``: a run's summary.csv; ``models``: ``{model: {ablation: [...], pretrain_epochs}}``
    (:func:`ibot.results.aggregate.models_info_from_config`)."""
    from ibot.results.aggregate import aggregate

    reference = load_ablations() if reference is None else reference
    pooled = aggregate(summary) if len(summary) else pd.DataFrame(columns=["model", "stage", "metric", "mean"])
    ours = {(r.model, r.stage, r.metric): r for r in pooled.itertuples(index=False)}
    out = []
    for table, rows in reference.groupby("table", sort=False):
        multi = rows.groupby(["setting", "task"])["epochs_n"].nunique().max() > 1
        for row in rows.itertuples(index=False):
            value = ci_low = ci_high = None
            our_model = ""
            epochs = {m: info.get("pretrain_epochs") for m, info in models.items()
                      if row.setting in (info.get("ablation") or [])}
            found = _select(row, epochs) if (row.task, row.metric) in TASK_STAGE else None
            if isinstance(found, tuple):
                our_model, stage, metric = found
                record = ours.get((our_model, stage, metric))
                baseline = gain_baseline(row, models, our_model)
                if baseline is not None:  # a gain: ours minus the baseline model's same metric (no interval)
                    other = ours.get((baseline, stage, metric))
                    if record is not None and other is not None:
                        value = record.mean - other.mean
                    our_model = f"{our_model} - {baseline}" if baseline else our_model
                elif record is not None:
                    value, ci_low, ci_high = record.mean, record.ci_low, record.ci_high
            out.append({"table": table, "setting": row.setting, "model": row.model, "varies": row.varies,
                        "column": _column(row, multi), "paper": row.value, "ours": value, "ci_low": ci_low,
                        "ci_high": ci_high, "our_model": our_model, "delta_vs": row.delta_vs})
    frame = pd.DataFrame(out)
    devices = _pretraining_devices(summary)
    frame["measured_on"] = [devices.get(m, "") if c.startswith(("T", "Mem")) else ""
                            for m, c in zip(frame["our_model"], frame["column"])]
    for source, target in (("paper", "delta_paper"), ("ours", "delta_ours")):
        base = frame.set_index(["setting", "column"])[source].to_dict()
        frame[target] = [(v - base[(b, c)]) if b and pd.notna(v) and pd.notna(base.get((b, c))) else None
                         for v, b, c in zip(pd.to_numeric(frame[source]), frame["delta_vs"], frame["column"])]
    return frame


def _pretraining_devices(summary: pd.DataFrame) -> dict[str, str]:
    """``{model: "NVIDIA H100 x 16 processes, cuda_max_allocated"}`` from each pretraining's metrics.json
    (Tab. 19's hours and memory mean nothing without the device and what the memory figure counts)."""
    out = {}
    rows = summary[summary["stage"] == "pretrain"].drop_duplicates("model") if len(summary) else summary
    for model, path in zip(rows.get("model", []), rows.get("metrics_file", [])):
        try:
            info = json.loads(Path(str(path)).read_text())["extra"]["summary"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out[model] = (f"{info.get('device_name', '?')} x {info.get('world_size', '?')} processes, "
                      f"{info.get('memory_kind', '?')}")
    return out


def _fmt(value: Any, digits: int = 1, sign: bool = False) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_ablation_tables(frame: pd.DataFrame, run: str = "") -> str:
    """Markdown: one table per paper table, rows = settings, per printed column ours / paper, and the deltas
    against the table's reference row (Δ ours / Δ paper)."""
    if frame["ours"].notna().any():  # the tables this run has a number in
        frame = frame[frame.groupby("table")["ours"].transform(lambda v: v.notna().any())]
    text = [f"# Ablations{f' of run {run}' if run else ''}: ours beside the paper",
            "", "Cells: ours / paper (ours with its 95 % interval when a single run has one); Δ: against the "
                "table's reference row (the setting named in `delta_vs`), ours / paper. Empty: not run.", ""]
    for table, rows in frame.groupby("table", sort=False):
        # the printed order: that of the setting with the most columns, then any other
        widest = rows.groupby("setting", sort=False)["column"].agg(list).loc[lambda c: c.map(len).idxmax()]
        columns = list(dict.fromkeys([*widest, *rows["column"]]))
        has_delta = rows["delta_vs"].ne("").any()
        header = ["setting", "method", *columns] + ([f"Δ {c}" for c in columns] if has_delta else []) + ["our model"]
        text += [f"## {table}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for setting, cells in rows.groupby("setting", sort=False):
            by_column = {c.column: c for c in cells.itertuples(index=False)}
            first = cells.iloc[0]
            values, deltas = [], []
            for column in columns:
                cell = by_column.get(column)
                if cell is None:
                    values.append("")
                    deltas.append("")
                    continue
                interval = f" [{_fmt(cell.ci_low)}, {_fmt(cell.ci_high)}]" if pd.notna(cell.ci_low) else ""
                values.append(f"{_fmt(cell.ours) or '–'}{interval} / {_fmt(cell.paper)}")
                deltas.append(f"{_fmt(cell.delta_ours, sign=True) or '–'} / {_fmt(cell.delta_paper, sign=True)}"
                              if cell.delta_vs else "ref.")
            line = [setting, f"{first['model']}: {first['varies']}", *values] + (deltas if has_delta else [])
            text.append("| " + " | ".join(line + [first["our_model"]]) + " |")
        measured = rows[rows["measured_on"] != ""][["our_model", "measured_on"]].drop_duplicates()
        if len(measured):  # the paper's: two 8-GPU V100 machines, batch 1024 (Tab. 19)
            text += ["", "Ours measured on: " + "; ".join(f"{m}: {d}" for m, d in measured.values) +
                     " (the paper: two 8-GPU V100 machines, batch 1024, peak GPU memory per GPU)"]
        text.append("")
    return "\n".join(text)


def write_ablation_tables(summary_path: str | Path, models_json: str, out_dir: str | Path, run: str = "") -> Path:
    """``ablations.md`` and ``ablations.csv`` in ``out_dir`` from a run's summary.csv (atomic writes)."""
    from ibot.io import write_text_atomic
    from ibot.results.aggregate import read_summaries

    frame = ablation_tables(read_summaries([summary_path]), json.loads(models_json))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "ablations.csv", frame.to_csv(index=False))
    write_text_atomic(out_dir / "ablations.md", format_ablation_tables(frame, run))
    return out_dir / "ablations.md"
