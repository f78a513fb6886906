"""Paper-style tables (classification, dense, robustness) in Markdown, CSV, LaTeX and HTML.

Rows per paper architecture P (``models.<name>.paper_model``): the paper's DINO P and iBOT P rows
(values from ``results/reference/``), then ours (mean ± std (n) over runs/seeds), then
"Δ vs paper" (ours − paper iBOT), and last the trivial baseline of every column (what a model that
learned nothing scores on the same items: chance, majority class, random ranking, first-frame copy...,
computed by the stage; :mod:`ibot.uncertainty`). A single run's value carries its 95 % interval
(``56.5 [49.6, 63.2]``). A stage that did not run, or a number the paper does not report, is an empty
cell; a metric the evaluator did not produce (null in metrics.json) is "n/a". Ours
next to a paper number but run with another protocol or dataset than the paper's (e.g. a
shortened schedule) is marked † and gets no Δ.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ibot.io import write_text_atomic
from ibot.results.aggregate import fmt_value, load_metric_map, load_reference, paper_values

__all__ = ["GROUPS", "GROUP_TITLES", "group_table", "metrics_table", "to_markdown", "to_latex", "to_html",
           "write_tables", "table_outputs", "latex_escape"]

GROUPS = ("classification", "semi_supervised", "unsupervised", "dense", "robustness", "transfer", "retrieval")
GROUP_TITLES = {
    "classification": "ImageNet-1K classification: k-NN, linear probe, fine-tuning (top-1 %, cf. Tab.1/Tab.2)",
    "dense": "Dense prediction: COCO detection / instance segmentation, ADE20K semantic segmentation (cf. Tab.6)",
    "robustness": "Robustness of the linear head on frozen features (top-1 %; ImageNet-C error %, lower is better; cf. Tab.8)",
    "semi_supervised": "Semi-supervised ImageNet classification with 1% / 10% of the labels (top-1 %, cf. Tab.4/Tab.12)",
    "unsupervised": "Unsupervised classification: [CLS] head argmax as cluster on ImageNet val (%, cf. Tab.5)",
    "transfer": "Transfer learning: fine-tuning on smaller datasets, DeiT recipe (top-1 %, cf. Tab.7)",
    "retrieval": "Image retrieval and video object segmentation (cf. Tab.16)",
}
FORMATS = ("md", "csv", "tex", "html")
_LEAD = ["Method", "Arch", "Source"]
#: Marks ours where the paper reports the experiment but this run used another protocol/dataset.
OFF_PROTOCOL = "†"
OFF_PROTOCOL_NOTE = (f"{OFF_PROTOCOL} not the paper's protocol or dataset (e.g. a shortened schedule; see "
                     "`protocol` and `paper_protocol` in summary.csv): no Δ vs paper.")
NULL_NOTE = "n/a: the stage ran but its evaluator produced no value (reason: `null_reason` in summary.csv)."
#: Marks ours pretrained with another global batch than its recipe's (pretrain.batch_rescale).
RESCALED = "‡"
RESCALED_NOTE = (f"{RESCALED} pretrained with another global batch than the recipe's, peak lr rescaled linearly "
                 "(pretrain.batch_rescale): ")
#: Marks ours whose recipe has values no offline source confirms (models.<m>.unverified, a recipe's unverified).
UNVERIFIED = "§"
UNVERIFIED_NOTE = (f"{UNVERIFIED} run with recipe values no source readable offline confirms (`python -m ibot.config "
                   "explain` says what would verify each): ")


#: The row of the trivial baselines (``baseline`` in summary.csv).
BASELINE_ROW = "trivial baseline"
BASELINE_NOTE = f"{BASELINE_ROW}: what a model that learned nothing scores on the same items: "
INTERVAL_NOTE = "[low, high]: 95 % interval of a single run's value over its evaluation items (`ci_method` in summary.csv)."


def _cell(mean: Any, std: Any = None, n: Any = None, off_protocol: bool = False,
          interval: tuple[Any, Any] | None = None) -> dict[str, Any]:
    return {"mean": mean, "std": std, "n": n, "off_protocol": off_protocol, "interval": interval}


def _paper_label(paper_model: str) -> tuple[str, str]:
    if paper_model.startswith("DINO "):
        return "DINO", paper_model[len("DINO "):]
    return "iBOT", paper_model


def _paper_row(paper: pd.DataFrame, paper_model: str, columns: Sequence[str]) -> dict[str, Any] | None:
    sub = paper[paper["paper_model"] == paper_model].set_index("column")
    if sub.empty or not set(sub.index) & set(columns):
        return None
    method, arch = _paper_label(paper_model)
    tables = sorted(set(sub.loc[[c for c in columns if c in sub.index], "paper_table"]), key=_table_key)
    row = {"Method": method, "Arch": arch,
           "Source": "paper " + ", ".join(t.split(" ")[0] for t in tables)}
    for column in columns:
        row[column] = _cell(sub.at[column, "paper_value"] if column in sub.index else None)
    return row


def _table_key(table: str) -> tuple[int, str]:
    head = table.split(" ")[0].removeprefix("Tab.")
    return (int(head), table) if head.isdigit() else (10**6, table)


def group_table(agg: pd.DataFrame, group: str, *, reference: pd.DataFrame | None = None,
                metric_map: pd.DataFrame | None = None, models: Sequence[str] | None = None) -> pd.DataFrame:
    """One paper-style table as a frame of cells ``{"mean", "std", "n"}`` (lead columns are text).

    ``agg`` is :func:`ibot.results.aggregate.aggregate` output (keys model, stage, metric).
    """
    reference = load_reference() if reference is None else reference
    metric_map = load_metric_map() if metric_map is None else metric_map
    lines = metric_map[metric_map["group"] == group]
    if lines.empty:
        raise ValueError(f"unknown table group {group!r}; expected one of {sorted(set(metric_map['group']))}")
    columns = list(dict.fromkeys(lines["column"]))  # a column has one line per pretraining data / variant
    models = list(models) if models is not None else list(dict.fromkeys(agg["model"]))
    info = agg.drop_duplicates("model").set_index("model") if len(agg) else pd.DataFrame()
    paper_model_of = {m: _text(info.at[m, "paper_model"]) if m in info.index else "" for m in models}
    arch_of = {m: _text(info.at[m, "arch"]) if m in info.index else "" for m in models}
    wanted = []
    for p in dict.fromkeys(p for p in paper_model_of.values() if p):
        if not p.startswith("DINO "):
            wanted.append(f"DINO {p}")
        wanted.append(p)
    paper = paper_values(reference, lines, wanted)

    values, on_protocol, unverified, baselines = {}, {}, {}, {}
    if len(agg):
        cells = lines[["stage", "metric", "column"]].drop_duplicates()
        merged = agg.merge(cells, on=["stage", "metric"], suffixes=("_agg", ""))
        several = merged[merged.duplicated(["model", "column"], keep=False)]
        if len(several):
            raise ValueError(f"table {group!r}: model/column pairs ran with several datasets or protocols "
                             f"{several[['model', 'column', 'dataset', 'protocol']].values.tolist()}; "
                             "pool only runs of one protocol into a table")
        for row in merged.itertuples(index=False):
            if _text(getattr(row, "unverified", "")):
                unverified.setdefault(row.model, set()).update(_text(row.unverified).split(", "))
            paper_run = bool(row.is_paper_protocol)
            off = bool(paper_model_of.get(row.model)) and bool(_text(row.paper_protocol)) and not paper_run
            low, high = getattr(row, "ci_low", None), getattr(row, "ci_high", None)
            interval = None if _missing(low) or _missing(high) else (low, high)
            values[(row.model, row.column)] = _cell(row.mean, row.std, row.n, off_protocol=off, interval=interval)
            on_protocol[(row.model, row.column)] = paper_run
            if not _missing(getattr(row, "baseline", None)) and row.model in models:
                baselines.setdefault(row.column, (row.baseline, _text(row.baseline_kind)))

    rows: list[dict[str, Any]] = []
    rescaled: dict[str, str] = {}
    for p in [p for p in dict.fromkeys(paper_model_of.values()) if p] + [""]:
        ibot_row = None
        for candidate in ([f"DINO {p}", p] if p and not p.startswith("DINO ") else [p] if p else []):
            row = _paper_row(paper, candidate, columns)
            if row is not None:
                rows.append(row)
                ibot_row = row if candidate == p else ibot_row
        ours = [m for m in models if paper_model_of[m] == p]
        for model in ours:
            runs = _text(info.at[model, "runs"]) if model in info.index and "runs" in info.columns else ""
            note = _text(info.at[model, "pretrain_note"]) if model in info.index and "pretrain_note" in info.columns else ""
            if note:
                rescaled[model] = note
            marks = (f" {RESCALED}" if note else "") + (f" {UNVERIFIED}" if model in unverified else "")
            row = {"Method": f"ours: {model}" + marks, "Arch": p or arch_of[model],
                   "Source": f"run {runs}" if runs else ""}
            row.update({c: values.get((model, c), _cell(None)) for c in columns})
            rows.append(row)
        if ibot_row is not None:
            for model in ours:
                row = {"Method": f"Δ {model} − paper", "Arch": p, "Source": ""}
                for c in columns:  # only where ours is the paper's experiment
                    ours_mean, paper_mean = values.get((model, c), {}).get("mean"), ibot_row[c]["mean"]
                    comparable = on_protocol.get((model, c), False) and not (_missing(ours_mean) or _missing(paper_mean))
                    row[c] = _cell(float(ours_mean) - float(paper_mean) if comparable else None)
                rows.append(row)
    if baselines:
        row = {"Method": BASELINE_ROW, "Arch": "", "Source": "computed by the stage"}
        row.update({c: _cell(baselines[c][0]) if c in baselines else _cell(None) for c in columns})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=_LEAD + columns)
    pooled = bool(len(agg)) and bool((pd.to_numeric(agg["n"], errors="coerce") > 1).any())
    cells = [frame.at[i, c] for i in frame.index for c in columns]
    notes = ([OFF_PROTOCOL_NOTE] if any(cell.get("off_protocol") for cell in cells) else []) + \
        ([NULL_NOTE] if any(_is_null(cell) for cell in cells) else []) + \
        ([RESCALED_NOTE + "; ".join(f"{m}: {n}" for m, n in rescaled.items())] if rescaled else []) + \
        ([UNVERIFIED_NOTE + "; ".join(f"{m}: {', '.join(sorted(k))}" for m, k in unverified.items())]
         if unverified else []) + \
        ([INTERVAL_NOTE] if any(cell.get("interval") for cell in cells) else []) + \
        ([BASELINE_NOTE + _baseline_kinds(baselines)] if baselines else [])
    frame.attrs.update(group=group, title=GROUP_TITLES.get(group, group), columns=columns, pooled=pooled, notes=notes)
    return frame


def _baseline_kinds(baselines: dict[str, tuple[float, str]]) -> str:
    """``kind (column, column); kind (column)``: which baseline each column shows."""
    columns_of: dict[str, list[str]] = {}
    for column, (_, kind) in baselines.items():
        columns_of.setdefault(kind or "unnamed", []).append(column)
    return "; ".join(f"{kind} ({', '.join(columns)})" for kind, columns in columns_of.items())


def metrics_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Every metric of every model (long), with the paper value and delta: the complete record."""
    out = pd.DataFrame({
        "model": agg["model"], "paper_model": agg["paper_model"].map(_text), "stage": agg["stage"],
        "dataset": agg["dataset"], "protocol": agg["protocol"], "metric": agg["metric"], "mean": agg["mean"],
        "std": agg["std"], "n": agg["n"], "ci_low": agg["ci_low"], "ci_high": agg["ci_high"],
        "baseline": agg["baseline"], "baseline_kind": agg["baseline_kind"].map(_text), "paper_protocol": agg["paper_protocol"].map(_text),
        "paper": pd.to_numeric(agg["paper_value"], errors="coerce"), "delta": agg["delta"], "runs": agg["runs"],
        "seeds": agg["seeds"], "null_reason": agg["null_reason"].map(_text)})
    return out.reset_index(drop=True)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or bool(pd.isna(value))


def _is_null(cell: dict[str, Any]) -> bool:
    """The stage ran (a row exists) but no value was produced: n == 0."""
    n = cell.get("n")
    return not _missing(n) and int(n) == 0


def _text(value: Any) -> str:
    return "" if _missing(value) else str(value)


def _display(frame: pd.DataFrame, pm: str = " ± ") -> pd.DataFrame:
    columns = frame.attrs.get("columns", [c for c in frame.columns if c not in _LEAD])
    pooled = frame.attrs.get("pooled", False)  # several runs/seeds: every "ours" cell says its n
    out = frame[_LEAD].copy()
    for column in columns:
        out[column] = [_fmt_cell(cell, pm, delta=str(method).startswith("Δ"), always_n=pooled)
                       for cell, method in zip(frame[column], frame["Method"])]
    return out


def _fmt_cell(cell: dict[str, Any], pm: str, delta: bool, always_n: bool = False) -> str:
    if _is_null(cell):
        return "n/a"
    text = fmt_value(cell.get("mean"), cell.get("std"), cell.get("n"), pm=pm, always_n=always_n)
    if delta and text and not text.startswith("-"):
        text = "+" + text
    if text and cell.get("interval") and not delta:
        low, high = cell["interval"]
        text += f" [{float(low):.1f}, {float(high):.1f}]"
    if text and cell.get("off_protocol"):
        text += OFF_PROTOCOL
    return text


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    columns = frame.attrs.get("columns", [c for c in frame.columns if c not in _LEAD])
    out = frame[_LEAD].copy()
    for column in columns:
        out[column] = [c.get("mean") for c in frame[column]]
        out[f"{column} std"] = [c.get("std") for c in frame[column]]
        out[f"{column} n"] = [c.get("n") for c in frame[column]]
        out[f"{column} ci_low"] = [(c.get("interval") or (None, None))[0] for c in frame[column]]
        out[f"{column} ci_high"] = [(c.get("interval") or (None, None))[1] for c in frame[column]]
    return out


def to_markdown(frame: pd.DataFrame) -> str:
    display = _display(frame)
    title = frame.attrs.get("title")
    table = display.to_markdown(index=False, disable_numparse=True) if len(display) else _empty_markdown(display)
    notes = "".join(f"\n{note}\n" for note in frame.attrs.get("notes", []))
    return (f"**{title}**\n\n" if title else "") + table + "\n" + notes


def _empty_markdown(display: pd.DataFrame) -> str:
    header = "| " + " | ".join(display.columns) + " |"
    return header + "\n|" + "|".join("---" for _ in display.columns) + "|"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return (out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("−", "$-$")
            .replace(OFF_PROTOCOL, r"$^\dagger$"))


def to_latex(frame: pd.DataFrame, *, label: str | None = None) -> str:
    display = _display(frame)
    escaped = display.map(latex_escape)
    escaped.columns = [latex_escape(c) for c in display.columns]
    fmt = "l" * len(_LEAD) + "r" * (len(display.columns) - len(_LEAD))
    title = frame.attrs.get("title")
    notes = " ".join(frame.attrs.get("notes", []))
    caption = " ".join(t for t in (title, notes) if t)
    return escaped.to_latex(index=False, escape=False, column_format=fmt, na_rep="",
                            caption=latex_escape(caption) if caption else None,
                            label=label or f"tab:{frame.attrs.get('group', 'results').replace('_', '-')}")


# The report (snakemake --report) shows each table in an iframe beside its navigation panel, about
# 1100 px wide on a 1600 px screen. Value cells ("n") are right-aligned and never wrap (a value split
# over two lines reads as two rows); text cells ("t") are left-aligned like their headers and do not
# wrap either, except long ones ("t long": protocols, run lists), which wrap within a bounded width so
# that they do not push the metric and its value off screen; headers may wrap. A table still wider
# than the frame scrolls sideways instead of being clipped.
_HTML_STYLE = ("body{font-family:sans-serif;font-size:13px;margin:10px} h3{font-size:15px;margin:4px 0 10px}"
               ".scroll{overflow-x:auto} table.results{border-collapse:collapse}"
               "table.results td,table.results th{padding:3px 6px;border-bottom:1px solid #ddd;vertical-align:top}"
               "table.results th{vertical-align:bottom;white-space:normal} .n{text-align:right;white-space:nowrap}"
               ".t{text-align:left;white-space:nowrap} .t.long{white-space:normal;overflow-wrap:anywhere;"
               "min-width:22em;max-width:36em} table.results tbody tr:hover{background:#f2f2f2}")
_LONG_TEXT = 40  # characters


def _html_table(display: pd.DataFrame, numeric: Sequence[str]) -> str:
    """``display`` (text cells) as an HTML table whose cells carry the classes of :data:`_HTML_STYLE`."""
    def cell(tag: str, value: Any, column: str) -> str:
        text = _text(value)
        kind = "n" if column in numeric else "t long" if len(text) > _LONG_TEXT else "t"
        return f'<{tag} class="{kind}">{html.escape(text)}</{tag}>'

    head = "".join(cell("th", column, column) for column in display.columns)
    rows = "".join("<tr>" + "".join(cell("td", value, column) for value, column in zip(row, display.columns))
                   + "</tr>\n" for row in display.itertuples(index=False))
    return f'<table class="results">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}</tbody>\n</table>'


def to_html(frame: pd.DataFrame, *, display: pd.DataFrame | None = None,
            numeric: Sequence[str] | None = None) -> str:
    """A standalone HTML page (the report embeds it as is). ``numeric``: the value columns of ``display``
    (default: a paper-style table's metric columns)."""
    display = _display(frame) if display is None else display
    numeric = frame.attrs.get("columns", []) if numeric is None else numeric
    title = frame.attrs.get("title", "")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
            f"<style>{_HTML_STYLE}</style></head><body>\n"
            f"<h3>{html.escape(title)}</h3>\n<div class=\"scroll\">{_html_table(display, list(numeric))}</div>\n"
            "<p>Empty cell: stage not run, or number not reported by the paper. "
            "Values: mean ± std (n) over runs/seeds when n &gt; 1.</p>\n"
            + "".join(f"<p>{_html_note(note)}</p>\n" for note in frame.attrs.get("notes", []))
            + "</body></html>\n")


def _html_note(note: str) -> str:
    """A note is Markdown (shared with the .md table): its `code` spans become <code>, not raw backticks."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(note))


def table_outputs(out_dir: str | Path, formats: Sequence[str] = FORMATS) -> list[str]:
    """The files :func:`write_tables` writes (Snakemake outputs)."""
    out_dir = Path(out_dir)
    names = [f"{group}.{ext}" for group in GROUPS for ext in formats]
    names += [f"all_metrics.{ext}" for ext in ("md", "csv", "html")]
    return [str(out_dir / name) for name in names]


def write_tables(agg: pd.DataFrame, out_dir: str | Path, *, reference: pd.DataFrame | None = None,
                 metric_map: pd.DataFrame | None = None, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write every group table in every format plus ``all_metrics``; returns the paths."""
    reference = load_reference() if reference is None else reference
    metric_map = load_metric_map() if metric_map is None else metric_map
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group in GROUPS:
        frame = group_table(agg, group, reference=reference, metric_map=metric_map)
        for ext in formats:
            path = out_dir / f"{group}.{ext}"
            if ext == "md":
                write_text_atomic(path, to_markdown(frame))
            elif ext == "csv":
                _numeric(frame).to_csv(path, index=False, float_format="%.4f")
            elif ext == "tex":
                write_text_atomic(path, to_latex(frame))
            elif ext == "html":
                write_text_atomic(path, to_html(frame))
            else:
                raise ValueError(f"unknown table format {ext!r}; expected {FORMATS}")
            written.append(path)
    full = metrics_table(agg)
    full_display = full.copy()
    for column in ("mean", "std", "paper", "delta", "ci_low", "ci_high", "baseline"):
        full_display[column] = [fmt_value(v, digits=2) for v in full[column]]
    full_display["mean"] = ["n/a" if not _missing(n) and int(n) == 0 else text
                            for text, n in zip(full_display["mean"], full["n"])]
    full_display["n"] = full["n"].map(lambda v: "" if _missing(v) else str(int(v)))
    write_text_atomic(out_dir / "all_metrics.md",
           "**All metrics (mean, sample std, n over runs/seeds; a single run's 95 % interval; the trivial baseline; "
           "paper value and delta where reported)**\n\n"
           + (full_display.to_markdown(index=False, disable_numparse=True) if len(full_display)
              else _empty_markdown(full_display)) + "\n")
    full.to_csv(out_dir / "all_metrics.csv", index=False, float_format="%.4f")
    frame = pd.DataFrame()
    frame.attrs["title"] = "All metrics"
    write_text_atomic(out_dir / "all_metrics.html",
                      to_html(frame, display=full_display,
                              numeric=("mean", "std", "n", "ci_low", "ci_high", "baseline", "paper", "delta")))
    written += [out_dir / "all_metrics.md", out_dir / "all_metrics.csv", out_dir / "all_metrics.html"]
    return written
