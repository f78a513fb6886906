"""Figures of a run (matplotlib, Agg): pretraining curves and schedules, linear-probe accuracy per
learning rate, robustness curves, ours vs paper. Every figure file is always written (a panel
without data says so), so the Snakemake outputs exist whatever subset of stages ran.

Side files read (tolerant to column names, see ``_pick``):
``<run>/<model>/pretrain/train_log.csv`` (epoch, iteration, loss, cls, patch, lr, wd, momentum,
teacher_temp, teacher_patch_temp, images_per_s), ``<run>/<model>/linear/per_head.csv`` (lr, epoch,
top1), ``<run>/<model>/occlusion/curves.csv`` (mode, dropped_patch_fraction or ratio, top1 — long or wide),
``<run>/<model>/imagenet_c/*.csv`` (corruption, [severity], error or top1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ibot.io import atomic_write
from ibot.stages import BACKBONE_STAGE

__all__ = ["PLOT_FILES", "CURVE_SETS", "curve_outputs", "plot_outputs", "make_plots", "plot_pretrain", "plot_linear_lr", "plot_robustness",
           "plot_ours_vs_paper", "write_curves_csv", "read_train_log"]

PLOT_FILES = ("pretrain_loss.png", "pretrain_schedules.png", "linear_lr.png", "robustness.png",
              "ours_vs_paper.png")
_DPI = 110


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (Snakefiles import this module)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_outputs(out_dir: str | Path) -> list[str]:
    return [str(Path(out_dir) / name) for name in PLOT_FILES]


def _pick(columns: Iterable[str], *candidates: str) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _finish(ax, drawn: bool, empty: str, title: str, xlabel: str | None = None, ylabel: str | None = None) -> None:
    """A panel's title, axis labels and legend when something was drawn, else its ``empty`` note."""
    if not drawn:
        return _no_data(ax, empty)
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, dpi=_DPI, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


# -- pretraining ----------------------------------------------------------------------------------
def read_train_log(path: str | Path) -> pd.DataFrame:
    """A pretraining log (CSV, or JSON lines) with an ``iteration`` column (derived if absent)."""
    path = Path(path)
    frame = pd.read_json(path, lines=True) if path.suffix in (".jsonl", ".txt") else pd.read_csv(path)
    if "iteration" not in frame.columns:
        frame["iteration"] = range(len(frame))
    return frame.sort_values("iteration", kind="stable").reset_index(drop=True)


#: Down-sampled pretraining curves for ``dvc plots`` (results/<run>/dvc.yaml: one plot per folder of
#: ``results/<run>/curves/``): folder -> columns (besides epoch and iteration).
CURVE_SETS = {"loss": ("loss", "cls", "patch"), "lr": ("lr", "wd"),
              "teacher": ("momentum", "teacher_temp", "teacher_patch_temp")}


def curve_outputs(curves_dir: str | Path, models: Sequence[str]) -> list[str]:
    return [str(Path(curves_dir) / name / f"pretrain_{m}.csv") for m in models for name in CURVE_SETS]


def write_curves_csv(log_path: str | Path, out_csv: str | Path, max_points: int = 2000,
                     columns: Sequence[str] | None = None) -> Path:
    """Down-sampled copy of a train log for ``dvc plots`` (small enough for git; last row kept)."""
    frame = read_train_log(log_path)
    if columns is not None:
        frame = frame[[c for c in ("epoch", "iteration", *columns) if c in frame.columns]]
    if len(frame) > max_points:
        step = math.ceil(len(frame) / max_points)
        keep = frame.index[::step].union(frame.index[-1:])
        frame = frame.loc[keep]
    with atomic_write(out_csv, newline="") as handle:
        frame.to_csv(handle, index=False)
    return Path(out_csv)


def _smooth(values: pd.Series) -> pd.Series:
    window = max(1, len(values) // 50)
    return values.rolling(window, min_periods=1).mean()


def plot_pretrain(logs: Mapping[str, str | Path], out_loss: str | Path, out_schedules: str | Path) -> list[Path]:
    """Loss curves (total, [CLS], patch) and schedules (lr, wd, momentum, temperatures) per model."""
    plt = _pyplot()
    frames = {label: read_train_log(p) for label, p in logs.items() if Path(p).is_file()}
    # mathtext, so the panel reads as the paper's symbols rather than as raw "L_[CLS]"
    losses = (("loss", "total loss"), ("cls", r"[CLS] loss ($\mathcal{L}_{\mathrm{[CLS]}}$)"),
              ("patch", r"patch loss ($\mathcal{L}_{\mathrm{MIM}}$)"))
    fig, axes = plt.subplots(1, len(losses), figsize=(13, 3.6))
    _plot_columns(axes, frames, losses, smooth=True)
    paths = [_save(fig, out_loss)]

    schedules = (("lr", "learning rate"), ("wd", "weight decay"), ("momentum", "teacher momentum"),
                 ("teacher_temp", "teacher temp ([CLS])"), ("teacher_patch_temp", "teacher temp (patch)"))
    fig, axes = plt.subplots(1, len(schedules), figsize=(17, 3.4))
    _plot_columns(axes, frames, schedules, smooth=False)
    paths.append(_save(fig, out_schedules))
    return paths


def _plot_columns(axes, frames: Mapping[str, Any], columns, *, smooth: bool) -> None:
    """One panel per (column, title): every model's curve (raw, plus a smoothed line when ``smooth``)."""
    for ax, (column, title) in zip(axes, columns):
        drawn = False
        for label, frame in frames.items():
            if column not in frame.columns:
                continue
            if smooth:
                line, = ax.plot(frame["iteration"], frame[column], alpha=0.25, lw=0.8)
                ax.plot(frame["iteration"], _smooth(frame[column]), color=line.get_color(), lw=1.5, label=label)
            else:
                ax.plot(frame["iteration"], frame[column], lw=1.2, label=label)
            drawn = True
        _finish(ax, drawn, f"{title}: no data", title, "iteration")


# -- linear probe -----------------------------------------------------------------------------------
def plot_linear_lr(per_head: Mapping[str, str | Path], out: str | Path) -> Path:
    """Best top-1 (over epochs) of every head of the linear sweep against its learning rate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for label, path in per_head.items():
        if not Path(path).is_file():
            continue
        frame = pd.read_csv(path)
        lr, top1 = _pick(frame.columns, "lr", "base_lr"), _pick(frame.columns, "top1", "acc1", "acc", "accuracy")
        if lr is None or top1 is None:
            continue
        extra = [c for c in ("n_last_blocks", "avgpool", "avgpool_patchtokens", "wd", "weight_decay")
                 if c in frame.columns and frame[c].nunique() > 1]
        for key, sub in (frame.groupby(extra) if extra else [((), frame)]):
            best = sub.groupby(lr)[top1].max().sort_index()
            suffix = "" if not extra else " " + ",".join(f"{k}={v}" for k, v in zip(extra, _tuple(key)))
            ax.plot(best.index, best.values, marker="o", label=f"{label}{suffix}")
            drawn = True
    if drawn:
        ax.set_xscale("log")
    _finish(ax, drawn, "linear probe: no per_head.csv", "linear probe sweep", "learning rate (per head)",
            "best top-1 (%)")
    return _save(fig, out)


def _tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


# -- robustness -------------------------------------------------------------------------------------
def _occlusion_long(frame: pd.DataFrame) -> pd.DataFrame | None:
    # The x axis is the fraction of patches actually dropped when the evaluator records it: the official
    # ratio (lambda) is attention mass dropped for salient but attention mass *kept* for non-salient, so
    # against lambda the non-salient curve runs backwards (chance at 0, above clean at 0.9).
    x = _pick(frame.columns, "dropped_patch_fraction", "ratio", "drop_ratio", "information_loss", "info_loss",
              "loss_ratio", "fraction", "drop", "p")
    if x is None:
        return None
    series = _pick(frame.columns, "mode", "kind", "method", "type", "strategy", "order")
    y = _pick(frame.columns, "top1", "acc1", "acc", "accuracy")
    if series is not None and y is not None:
        return frame.rename(columns={x: "x", series: "series", y: "y"})[["x", "series", "y"]]
    numeric = [c for c in frame.columns if c != x and pd.api.types.is_numeric_dtype(frame[c])]
    if not numeric:
        return None
    return frame.melt(id_vars=[x], value_vars=numeric, var_name="series", value_name="y").rename(columns={x: "x"})


def _imagenet_c_long(paths: Sequence[Path]) -> pd.DataFrame | None:
    for path in paths:
        frame = pd.read_csv(path)
        corruption = _pick(frame.columns, "corruption", "name", "corruption_type")
        error = _pick(frame.columns, "error", "err", "top1_error", "top1_err")
        accuracy = _pick(frame.columns, "top1", "acc", "acc1", "accuracy")
        if corruption is None or (error is None and accuracy is None):
            continue
        values = frame[error] if error is not None else 100.0 - frame[accuracy]
        return pd.DataFrame({"corruption": frame[corruption], "error": values})
    return None


def plot_robustness(occlusion: Mapping[str, str | Path], imagenet_c: Mapping[str, Sequence[str | Path]],
                    out: str | Path) -> Path:
    """Occlusion accuracy vs information loss (salient / non-salient / random) and ImageNet-C error per corruption."""
    plt = _pyplot()
    fig, (ax_occ, ax_c) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    drawn = False
    for label, path in occlusion.items():
        if not Path(path).is_file():
            continue
        long = _occlusion_long(pd.read_csv(path))
        if long is None:
            continue
        for series, sub in long.groupby("series", sort=True):
            sub = sub.sort_values("x")
            ax_occ.plot(sub["x"], sub["y"], marker="o", label=f"{label}: {series}")
            drawn = True
    _finish(ax_occ, drawn, "occlusion: no curves.csv", "occlusion", "information loss (fraction of patches dropped)",
            "top-1 (%)")

    per_model = {}
    for label, paths in imagenet_c.items():
        long = _imagenet_c_long([Path(p) for p in paths if Path(p).is_file()])
        if long is not None:
            per_model[label] = long.groupby("corruption", sort=True)["error"].mean()
    if per_model:
        table = pd.DataFrame(per_model)
        width = 0.8 / len(table.columns)
        positions = range(len(table.index))
        for i, label in enumerate(table.columns):
            ax_c.bar([p + i * width for p in positions], table[label].values, width=width, label=label)
        ax_c.set_xticks([p + 0.4 - width / 2 for p in positions])
        ax_c.set_xticklabels(table.index, rotation=60, ha="right", fontsize=7)
    _finish(ax_c, bool(per_model), "ImageNet-C: no per-corruption CSV", "ImageNet-C per corruption",
            ylabel="top-1 error (%), mean over severities")
    return _save(fig, out)


# -- ours vs paper --------------------------------------------------------------------------------
def plot_ours_vs_paper(agg: pd.DataFrame, out: str | Path) -> Path:
    """Horizontal bars: ours (mean, ± std error bar) beside the paper's number, every reported metric."""
    plt = _pyplot()
    rows = agg[pd.to_numeric(agg.get("paper_value"), errors="coerce").notna()] if len(agg) else agg
    height = max(3.0, 0.45 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(7.5, height))
    if len(rows):
        labels = [f"{m} · {c if isinstance(c, str) and c else s + '/' + k}"
                  for m, c, s, k in zip(rows["model"], rows["column"], rows["stage"], rows["metric"])]
        ys = list(range(len(rows)))
        errors = pd.to_numeric(rows["std"], errors="coerce").fillna(0.0).values
        ax.barh([y + 0.2 for y in ys], rows["mean"].values, height=0.4, xerr=errors, label="ours", color="C0")
        ax.barh([y - 0.2 for y in ys], pd.to_numeric(rows["paper_value"]).values, height=0.4, label="paper",
                color="C7")
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
    _finish(ax, bool(len(rows)), "no metric with a paper counterpart\n(models without paper_model, or stages not run)",
            "ours vs paper (iBOT rows of the paper's tables)", "%")
    return _save(fig, out)


# -- all of a run -----------------------------------------------------------------------------------
def _model_dirs(run_dir: Path) -> list[str]:
    """Model folders of a run: those holding a stage folder (with metrics.json) or a pretraining folder."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and any(
        q.is_dir() and (q.name == BACKBONE_STAGE.name or (q / "metrics.json").is_file()) for q in p.iterdir()))


def make_plots(run_dirs: Sequence[str | Path], agg: pd.DataFrame, out_dir: str | Path,
               models: Sequence[str] | None = None, curves_dir: str | Path | None = None) -> list[Path]:
    """Every figure of :data:`PLOT_FILES` for the runs in ``run_dirs`` (labels ``run/model`` when several).

    ``curves_dir``: also write the down-sampled ``pretrain_<model>.csv`` copies ``dvc plots`` reads.
    """
    run_dirs = [Path(d) for d in run_dirs]
    several = len(run_dirs) > 1
    logs, per_head, occlusion, imagenet_c = {}, {}, {}, {}
    for run_dir in run_dirs:
        names = models if models is not None else _model_dirs(run_dir)
        for model in names:
            label = f"{run_dir.name}/{model}" if several else model
            base = run_dir / model
            pretrain = base / BACKBONE_STAGE.name
            log = next((p for p in (pretrain / "train_log.csv", pretrain / "train_log.jsonl") if p.is_file()), None)
            if log is not None:
                logs[label] = log
                if curves_dir is not None:
                    for name, columns in CURVE_SETS.items():
                        write_curves_csv(log, Path(curves_dir) / name / f"pretrain_{label.replace('/', '_')}.csv",
                                         columns=columns)
            per_head[label] = base / "linear" / "per_head.csv"
            occlusion[label] = base / "occlusion" / "curves.csv"
            imagenet_c[label] = sorted((base / "imagenet_c").glob("*.csv")) if (base / "imagenet_c").is_dir() else []
    out_dir = Path(out_dir)
    paths = plot_pretrain(logs, out_dir / "pretrain_loss.png", out_dir / "pretrain_schedules.png")
    paths.append(plot_linear_lr(per_head, out_dir / "linear_lr.png"))
    paths.append(plot_robustness(occlusion, imagenet_c, out_dir / "robustness.png"))
    paths.append(plot_ours_vs_paper(agg, out_dir / "ours_vs_paper.png"))
    return paths
