"""Collect a run's ``metrics.json`` files into one tidy table and join the paper's numbers.

``summary.csv`` has one row per run x model x task x dataset x protocol x metric (see
:data:`SUMMARY_COLUMNS`). The paper value of a row comes from ``results/reference/`` through
``metric_map.csv`` (our (stage, metric) -> one reference row) and the model's paper label
(:func:`paper_label`: ``models.<name>.paper_model``, plus its ``pretrain_data`` when not IN-1K and its
``paper_variant``, e.g. ``ViT-B/16, IN-22K`` or ``ViT-S/16, no multi-crop``): a label is compared only
with the mapping lines of its pretraining data and variant, the first (in file order) that has a
reference value. No paper row -> empty cells, never a derived number.

A paper number is joined only to the paper's experiment: ``paper_protocols.csv`` gives, per paper
model and stage, the dataset and protocol labels our stage writes when it runs the paper's recipe
(e.g. ``coco`` / ``cascade-mask-rcnn,1x``). A run with another protocol (a shortened embedded
schedule, other scales) or dataset keeps ``paper_dataset``/``paper_protocol`` for reference, has
``is_paper_protocol`` false and no ``paper_value``/``delta``. A metric the evaluator did not
produce (``null`` in metrics.json) has no ``value`` and says why in ``null_reason``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ibot.io import atomic_write, write_json_atomic
from ibot.metrics import NULL_REASONS, read_metrics

__all__ = ["REFERENCE_DIR", "REFERENCE_CSV", "METRIC_MAP_CSV", "PAPER_PROTOCOLS_CSV", "SUMMARY_COLUMNS", "AGG_KEYS",
           "load_reference", "load_metric_map", "load_paper_protocols", "paper_values", "paper_label",
           "parse_paper_label", "find_metrics_files",
           "build_summary",
           "flat_metrics", "write_summary", "read_summaries", "aggregate", "models_info_from_config",
           "load_models_info", "fmt_value"]

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = REPO_ROOT / "results" / "reference"
REFERENCE_CSV = REFERENCE_DIR / "ibot_paper_results.csv"
METRIC_MAP_CSV = REFERENCE_DIR / "metric_map.csv"
PAPER_PROTOCOLS_CSV = REFERENCE_DIR / "paper_protocols.csv"

SUMMARY_COLUMNS = [
    "run", "model", "paper_model", "arch", "pretrain_note", "unverified", "stage", "task", "dataset", "protocol", "metric",
    "value", "ci_low", "ci_high", "ci_method", "ci_n", "baseline", "baseline_kind",
    "null_reason", "seed", "paper_dataset", "paper_protocol", "is_paper_protocol", "paper_value", "delta",
    "higher_is_better", "group", "column", "paper_table", "paper_source", "paper_note", "checkpoint_sha256",
    "wall_time_s", "created", "metrics_file",
]
#: A "setting" whose runs/seeds are pooled into mean ± std (n): never across datasets or protocols.
AGG_KEYS = ("model", "stage", "dataset", "protocol", "metric")
#: Paper columns blanked on rows that are not the paper's experiment.
_PAPER_COLUMNS = ("paper_value", "paper_table", "paper_source", "paper_note")
_REF_JOIN = {"paper_table": "table", "paper_model": "model", "paper_pretrain_data": "pretrain_data",
             "paper_task": "task", "paper_dataset": "dataset", "paper_protocol": "protocol",
             "paper_metric": "metric"}


#: Pretraining data of the standard reference rows (a label names other data explicitly).
STANDARD_PRETRAIN_DATA = "IN-1K"
PRETRAIN_DATA = ("IN-1K", "IN-22K")


# -- reference --------------------------------------------------------------------------------------
def paper_label(paper_model: str | None, pretrain_data: str | None = None, variant: str | None = None) -> str | None:
    """The label a model's numbers are compared under: ``ViT-B/16``, ``ViT-B/16, IN-22K``,
    ``ViT-S/16, no multi-crop``, ``ViT-L/16, IN-22K, FT 512`` (None without a paper model)."""
    if not paper_model:
        return None
    parts = [paper_model]
    if pretrain_data and pretrain_data != STANDARD_PRETRAIN_DATA:
        parts.append(pretrain_data)
    if variant:
        parts.append(variant)
    return ", ".join(parts)


def parse_paper_label(label: str) -> tuple[str, str, str]:
    """Inverse of :func:`paper_label`: (reference model, pretraining data, variant or "")."""
    model, *rest = label.split(", ")
    pretrain = rest.pop(0) if rest and rest[0] in PRETRAIN_DATA else STANDARD_PRETRAIN_DATA
    return model, pretrain, ", ".join(rest)


def load_reference(path: str | Path = REFERENCE_CSV) -> pd.DataFrame:
    """The paper's reported numbers (all columns text, ``value`` float)."""
    ref = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = ["table", "model", "pretrain_data", "epochs", "task", "dataset", "protocol", "metric", "value",
                "unit", "source", "note"]
    if list(ref.columns) != expected:
        raise ValueError(f"reference {path}: columns {list(ref.columns)}, expected {expected}")
    ref["value"] = pd.to_numeric(ref["value"], errors="raise").astype(float)
    return ref


def load_metric_map(path: str | Path = METRIC_MAP_CSV) -> pd.DataFrame:
    """Our (stage, metric) -> reference row, in table-column order (see results/reference/README.md)."""
    mapping = pd.read_csv(path, dtype=str, keep_default_na=False)
    required = ["group", "column", "stage", "metric", *_REF_JOIN.keys() - {"paper_model"}, "variant",
                "higher_is_better"]
    missing = [c for c in required if c not in mapping.columns]
    if missing:
        raise ValueError(f"metric map {path}: missing columns {missing}")
    # one line per table cell of a label: (group, column) for each pretraining data and variant
    key = ["group", "column", "paper_pretrain_data", "variant"]
    duplicated = mapping[mapping.duplicated(key, keep=False)]
    if len(duplicated):
        raise ValueError(f"metric map {path}: duplicate {key}: {duplicated[key].values.tolist()}")
    mapping["higher_is_better"] = mapping["higher_is_better"].map({"1": True, "0": False, "": True})
    mapping["order"] = range(len(mapping))
    return mapping


def load_paper_protocols(path: str | Path = PAPER_PROTOCOLS_CSV) -> pd.DataFrame:
    """Per (paper model, stage): the dataset and protocol labels of the paper's experiment (all text)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = ["paper_model", "stage", "dataset", "protocol", "source"]
    if list(table.columns) != expected:
        raise ValueError(f"paper protocols {path}: columns {list(table.columns)}, expected {expected}")
    empty = table[(table[["paper_model", "stage", "dataset", "protocol"]] == "").any(axis=1)]
    if len(empty):
        raise ValueError(f"paper protocols {path}: empty cells in rows {empty.index.tolist()}")
    dup = table[table.duplicated(["paper_model", "stage"], keep=False)]
    if len(dup):
        raise ValueError(f"paper protocols {path}: several rows for {dup[['paper_model', 'stage']].values.tolist()}")
    return table


def paper_values(reference: pd.DataFrame, metric_map: pd.DataFrame, paper_models: Iterable[str]) -> pd.DataFrame:
    """Reference value of every mapping line for each paper label (:func:`paper_label`), using only the
    lines of the label's pretraining data and variant (rows without a value dropped).

    Columns: paper_model (the label), group, column, stage, metric, paper_value, paper_table, paper_source,
    paper_note, unit, order.
    """
    labels = sorted({m for m in paper_models if isinstance(m, str) and m})
    cols = ["paper_model", "group", "column", "stage", "metric", "paper_value", "paper_table", "paper_source",
            "paper_note", "unit", "order"]
    if not labels:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "paper_value" else object) for c in cols})
    lines = metric_map[metric_map["paper_table"] != ""]
    identities = pd.DataFrame([(label, *parse_paper_label(label)) for label in labels],
                              columns=["paper_model", "_model", "paper_pretrain_data", "variant"])
    grid = lines.merge(identities, on=["paper_pretrain_data", "variant"], how="inner")
    join = {**{k: v for k, v in _REF_JOIN.items() if k != "paper_model"}, "_model": "model"}
    ref = reference.rename(columns={v: k for k, v in join.items()})
    ref = ref.rename(columns={"value": "paper_value", "source": "paper_source", "note": "paper_note"})
    joined = grid.merge(ref[list(join) + ["paper_value", "paper_source", "paper_note", "unit"]],
                        on=list(join), how="inner")
    dup = joined[joined.duplicated(["paper_model", "group", "column"], keep=False)]
    if len(dup):
        raise ValueError("metric map matches several reference rows for "
                         f"{dup[['paper_model', 'group', 'column']].drop_duplicates().values.tolist()}; "
                         "make the mapping line more specific")
    if "order" not in joined.columns:
        joined["order"] = range(len(joined))
    return joined[cols].reset_index(drop=True)


# -- collection -------------------------------------------------------------------------------------
def find_metrics_files(run_dir: str | Path) -> list[Path]:
    """Every stage's ``metrics.json`` under ``results/<run>/`` (sorted); the runs of a sweep
    (``<stage>/sweep/...``, ibot.sweep) are not stage results: their best is the stage's file."""
    from ibot.sweep import SWEEP_DIR

    root = Path(run_dir)
    return sorted(p for p in root.rglob("metrics.json") if SWEEP_DIR not in p.relative_to(root).parts[:-1])


def _seed(record: Mapping[str, Any], default: int | None) -> int | None:
    for section in ("extra", "config"):
        value = (record.get(section) or {}).get("seed")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return default


def _records_frame(paths: Sequence[str | Path], default_seed: int | None) -> pd.DataFrame:
    rows = []
    for path in paths:
        record = read_metrics(path)  # checks values: numbers, or null with a reason
        checkpoint = record.get("checkpoint") or {}
        reasons = (record.get("extra") or {}).get(NULL_REASONS) or {}
        intervals, baselines = record.get("intervals") or {}, record.get("baselines") or {}
        for name, value in record["metrics"].items():
            interval, baseline = intervals.get(name) or {}, baselines.get(name) or {}
            rows.append({
                "run": record["run"], "model": record["model"], "stage": record["stage"], "task": record["task"],
                "dataset": record["dataset"], "protocol": record["protocol"], "metric": name,
                "value": math.nan if value is None else float(value),
                "ci_low": interval.get("low", math.nan), "ci_high": interval.get("high", math.nan),
                "ci_method": interval.get("method"), "ci_n": interval.get("n", math.nan),
                "baseline": baseline.get("value", math.nan),
                "baseline_kind": baseline.get("kind"), "null_reason": reasons.get(name),
                "seed": _seed(record, default_seed), "checkpoint_sha256": checkpoint.get("sha256"),
                "wall_time_s": record.get("wall_time_s"), "created": record.get("created"),
                "metrics_file": str(path)})
    frame = pd.DataFrame(rows, columns=["run", "model", "stage", "task", "dataset", "protocol", "metric", "value",
                                        "ci_low", "ci_high", "ci_method", "ci_n", "baseline", "baseline_kind",
                                        "null_reason",
                                        "seed", "checkpoint_sha256", "wall_time_s", "created", "metrics_file"])
    key = ["run", "model", "stage", "task", "dataset", "protocol", "metric"]
    dup = frame[frame.duplicated(key, keep=False)]
    if len(dup):
        raise ValueError("the same run/model/stage/metric comes from several metrics files: "
                         f"{sorted(set(dup['metrics_file']))}")
    return frame


def build_summary(paths: Sequence[str | Path], models_info: Mapping[str, Mapping[str, Any]] | None = None, *,
                  reference: pd.DataFrame | None = None, metric_map: pd.DataFrame | None = None,
                  paper_protocols: pd.DataFrame | None = None, default_seed: int | None = None) -> pd.DataFrame:
    """Tidy long table of ``paths`` (metrics files) with the paper's numbers and deltas joined
    (only on rows that are the paper's experiment: see the module docstring)."""
    reference = load_reference() if reference is None else reference
    metric_map = load_metric_map() if metric_map is None else metric_map
    paper_protocols = load_paper_protocols() if paper_protocols is None else paper_protocols
    models_info = dict(models_info or {})
    frame = _records_frame(paths, default_seed)
    info = lambda m, k: (models_info.get(m) or {}).get(k)  # noqa: E731
    frame["paper_model"] = pd.Series([info(m, "paper_model") for m in frame["model"]], index=frame.index, dtype=object)
    frame["arch"] = pd.Series([info(m, "arch") for m in frame["model"]], index=frame.index, dtype=object)
    frame["pretrain_note"] = pd.Series([info(m, "pretrain_note") or "" for m in frame["model"]], index=frame.index,
                                       dtype=object)
    frame["unverified"] = pd.Series([(info(m, "unverified") or {}).get(s, "")
                                     for m, s in zip(frame["model"], frame["stage"])], index=frame.index, dtype=object)

    # table placement: the first standard line of a (stage, metric); paper value: the first line of the
    # model's pretraining data and variant that has one (e.g. Tab.15 for an IN-22K ViT-B/16, absent from Tab.1)
    primary = metric_map[metric_map["variant"] == ""].drop_duplicates(["stage", "metric"], keep="first")
    frame = frame.merge(primary[["stage", "metric", "group", "column", "higher_is_better", "order"]],
                        on=["stage", "metric"], how="left")
    paper = paper_values(reference, metric_map, frame["paper_model"].dropna().unique())
    paper = paper.sort_values("order", kind="stable").drop_duplicates(["paper_model", "stage", "metric"])
    frame = frame.merge(paper[["paper_model", "stage", "metric", "paper_value", "paper_table", "paper_source",
                               "paper_note"]], on=["paper_model", "stage", "metric"], how="left")
    experiments = paper_protocols.rename(columns={"dataset": "paper_dataset", "protocol": "paper_protocol"})
    frame = frame.merge(experiments[["paper_model", "stage", "paper_dataset", "paper_protocol"]],
                        on=["paper_model", "stage"], how="left")
    frame["is_paper_protocol"] = ((frame["dataset"] == frame["paper_dataset"])
                                  & (frame["protocol"] == frame["paper_protocol"])).astype(bool)
    for column in _PAPER_COLUMNS:
        frame[column] = frame[column].where(frame["is_paper_protocol"])
    frame["delta"] = frame["value"] - frame["paper_value"]
    model_order = {m: i for i, m in enumerate(models_info)}
    frame["_m"] = [model_order.get(m, len(model_order)) for m in frame["model"]]
    frame = frame.sort_values(["_m", "model", "order", "stage", "metric"], na_position="last", kind="stable")
    return frame[SUMMARY_COLUMNS].reset_index(drop=True)


def flat_metrics(summary: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {stage: {metric: value}}}`` — the one file DVC tracks as the run's metrics."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in summary.itertuples(index=False):
        if pd.isna(row.value):  # a null metric (see null_reason): DVC metrics are numbers
            continue
        out.setdefault(row.model, {}).setdefault(row.stage, {})[row.metric] = round(float(row.value), 4)
    return {m: {s: dict(sorted(v.items())) for s, v in sorted(st.items())} for m, st in sorted(out.items())}


def write_summary(summary: pd.DataFrame, out_csv: str | Path, flat_json: str | Path | None = None) -> None:
    with atomic_write(out_csv, newline="") as handle:
        summary.to_csv(handle, index=False, float_format="%.6g")
    if flat_json is not None:
        write_json_atomic(flat_metrics(summary), flat_json)


def read_summaries(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate ``summary.csv`` files (several runs or seeds of one setting)."""
    frames = []
    for path in paths:
        frame = pd.read_csv(path, dtype={"run": str, "model": str, "paper_model": str, "stage": str, "metric": str,
                                         "dataset": str, "protocol": str, "paper_dataset": str, "paper_protocol": str,
                                         "null_reason": str, "checkpoint_sha256": str, "paper_table": str})
        for note in ("pretrain_note", "unverified"):
            if note not in frame.columns:  # summaries written before the column existed
                frame[note] = ""
            frame[note] = frame[note].astype(object).where(frame[note].notna(), "")
        for column in ("ci_low", "ci_high", "ci_method", "ci_n", "baseline", "baseline_kind"):
            if column not in frame.columns:  # summaries written before records carried intervals and baselines
                frame[column] = math.nan
        missing = [c for c in SUMMARY_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"summary {path}: missing columns {missing} (rebuild it with `ibot.results summary`)")
        frames.append(frame[SUMMARY_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    frames = [f for f in frames if len(f)] or frames[:1]
    out = pd.concat(frames, ignore_index=True)
    for column in ("value", "paper_value", "delta", "wall_time_s", "ci_low", "ci_high", "ci_n", "baseline"):
        out[column] = pd.to_numeric(out[column], errors="coerce")
    out["is_paper_protocol"] = out["is_paper_protocol"].astype(str).str.lower().eq("true")
    return out


def aggregate(summary: pd.DataFrame, keys: Sequence[str] = AGG_KEYS) -> pd.DataFrame:
    """Pool runs/seeds of one setting: mean, std (sample, NaN for n=1), n, runs, seeds; paper columns kept.

    ``n`` counts the values; a setting whose stage ran but whose metric is null everywhere has
    ``n == 0`` and no mean (tables show "n/a"). ``is_paper_protocol`` holds only if every pooled row
    is the paper's experiment. ``ci_low``/``ci_high`` (the 95 % interval of a single run) are kept only
    for n == 1 (pooled runs report their std); ``baseline`` is the first run's.
    """
    keys = list(keys)
    if summary.empty:
        return pd.DataFrame(columns=keys + ["mean", "std", "n", "runs", "seeds", "paper_model", "arch", "pretrain_note",
                                            "unverified", "ci_low", "ci_high", "baseline", "baseline_kind",
                                            "paper_value", "delta", "higher_is_better", "group", "column",
                                            "paper_table", "paper_protocol", "is_paper_protocol", "null_reason"])
    first = [c for c in ("paper_model", "arch", "pretrain_note", "unverified", "ci_low", "ci_high", "baseline",
                         "baseline_kind", "paper_value", "higher_is_better", "group", "column", "paper_table",
                         "paper_protocol", "null_reason") if c not in keys]
    grouped = summary.groupby(keys, dropna=False, sort=False)
    out = grouped["value"].agg(mean="mean", std="std", n="count").reset_index()
    out["std"] = out["std"].where(out["n"] > 1)
    extra = grouped.agg(**{c: (c, "first") for c in first},
                        is_paper_protocol=("is_paper_protocol", "all"),
                        runs=("run", lambda s: ",".join(sorted(set(map(str, s))))),
                        seeds=("seed", lambda s: ",".join(str(int(v)) for v in sorted(set(s.dropna()))))).reset_index()
    out = out.merge(extra, on=keys, how="left")
    out["delta"] = out["mean"] - pd.to_numeric(out["paper_value"], errors="coerce")
    for column in ("ci_low", "ci_high"):
        out[column] = pd.to_numeric(out[column], errors="coerce").where(out["n"] == 1)
    return out


# -- model info ---------------------------------------------------------------------------------------
def models_info_from_config(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{model: {paper_model, <ModelSpec fields>, weights, pretrain_note, unverified}}`` from a (validated)
    workflow config (``paper_model``: the model's paper label, :func:`paper_label`); ``pretrain_note`` says
    when the model is pretrained with another global batch than its recipe's (``pretrain.batch_rescale``),
    ``unverified`` ``{stage: "key, key"}`` which recipe values of a stage's number no offline source
    confirms (:func:`ibot.config.unverified_values`); the tables mark both."""
    from ibot.config import planned_stages, unverified_values
    from ibot.models.specs import ModelSpec

    out = {}
    for name, entry in (config.get("models") or {}).items():
        label = paper_label(entry.get("paper_model"), entry.get("pretrain_data"), entry.get("paper_variant"))
        marks = {stage: ", ".join(sorted(keys)) for stage in planned_stages(config, name)
                 if (keys := unverified_values(config, name, stage))}
        out[name] = {"paper_model": label, **ModelSpec.of(entry).as_dict(),
                     "weights": entry.get("weights", "pretrain"), "pretrain_note": pretrain_note(config, name),
                     "unverified": marks, "ablation": list(entry.get("ablation") or []),
                     "ablation_gain_over": entry.get("ablation_gain_over"),
                     "pretrain_epochs": _pretrain_epochs(config, name)}
    return out


def _pretrain_epochs(config: Mapping[str, Any], model: str) -> int | None:
    """Pretraining epochs of the backbone a model evaluates (its own or its ``weights_from`` model's)."""
    from ibot.results.ablations import model_epochs

    return model_epochs(config, model)


def pretrain_note(config: Mapping[str, Any], model: str) -> str:
    """"global batch 256 (recipe 1024), lr rescaled" for a rescaled pretraining run, else ""."""
    from ibot.config import global_batch

    if (config["models"][model].get("weights") or "pretrain") != "pretrain":
        return ""
    batch = global_batch(config, model)
    return f"global batch {batch['global']} (recipe {batch['recipe']}), lr rescaled" if batch["rescaled"] else ""


def load_models_info(config_path: str | Path | None = None, models_json: str | None = None) -> dict[str, Any]:
    """Model info from ``--models-json`` (JSON text or file) or a workflow config file (recipes resolved)."""
    if models_json:
        text = models_json if models_json.lstrip().startswith("{") else Path(models_json).read_text()
        return json.loads(text)
    if config_path:
        from ibot.config import load_yaml, validate_config

        config = validate_config(load_yaml(config_path), base_dir=REPO_ROOT)
        return models_info_from_config(config)
    return {}


def fmt_value(mean: float | None, std: float | None = None, n: int | None = None, *, digits: int = 1,
              pm: str = " ± ", always_n: bool = False) -> str:
    """``75.2``, ``75.2 ± 0.3 (n=3)``; empty string for a missing value (never a made-up number).

    ``always_n``: also ``(n=1)`` (a table pooling several runs where one stage ran once).
    """
    if mean is None or (isinstance(mean, float) and math.isnan(mean)) or pd.isna(mean):
        return ""
    text = f"{float(mean):.{digits}f}"
    if n is not None and not pd.isna(n) and (int(n) > 1 or always_n):
        spread = "" if std is None or pd.isna(std) else f"{pm}{float(std):.{digits}f}"
        text += f"{spread} (n={int(n)})"
    return text
