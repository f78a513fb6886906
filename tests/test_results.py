"""Results: summary/tables from fixture metrics, paper deltas, output formats, plots, comparison,
the DVC round trip (push -> fresh clone -> pull -> no pretraining planned) and the HTML report."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from ibot.results.__main__ import main as results_main
from ibot.metrics import write_metrics
from ibot.results.aggregate import (PAPER_PROTOCOLS_CSV, REFERENCE_CSV, SUMMARY_COLUMNS, aggregate, build_summary,
                                    find_metrics_files, flat_metrics, load_metric_map, load_paper_protocols,
                                    load_reference, paper_values, read_summaries, paper_label, parse_paper_label)
from ibot.results.compare import compare_paper, compare_runs
from ibot.stages import STAGES
from ibot.results.tables import GROUPS, group_table, to_latex, to_markdown, write_tables

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "metrics"
INFO = {"vit_small": {"paper_model": "ViT-S/16", "arch": "vit_small"},
        "vit_tiny": {"paper_model": None, "arch": "vit_tiny"}}
BIN = Path(sys.executable).parent


def _summary(run: str) -> pd.DataFrame:
    return build_summary(find_metrics_files(FIXTURES / run), INFO)


def _pooled() -> pd.DataFrame:
    return aggregate(pd.concat([_summary("seed0"), _summary("seed1")], ignore_index=True))


def _row(frame: pd.DataFrame, method: str) -> pd.Series:
    rows = frame[frame["Method"] == method]
    assert len(rows) == 1, (method, frame["Method"].tolist())
    return rows.iloc[0]


# -- reference and mapping ------------------------------------------------------------------------
#: sha256 of the shared reference file (../shared/reference/ibot_paper_results.csv) the tracked copy was made from.
REFERENCE_SHA256 = "076e6b3e82f313d449fc63d300d3e1ea23994de82d5b19ca6103daa511e4a264"


def test_reference_copy_is_the_shared_file():
    """The tracked copy is byte for byte the shared reference (its digest; and the file itself when a
    checkout has ../shared/reference beside it, which a /tmp clone does not)."""
    import hashlib
    assert hashlib.sha256(REFERENCE_CSV.read_bytes()).hexdigest() == REFERENCE_SHA256
    shared = REPO.parent / "shared" / "reference"
    if shared.is_dir():
        assert REFERENCE_CSV.read_bytes() == (shared / "ibot_paper_results.csv").read_bytes()
        tracked_readme = (REFERENCE_CSV.parent / "README.md").read_text()
        assert tracked_readme.startswith((shared / "README.md").read_text())  # + our "In this project" part


def test_metric_map_lines_resolve_to_one_reference_row():
    reference, mapping = load_reference(), load_metric_map()
    # every label a line can serve: each reference model x pretraining data x variant of the map
    models = sorted({paper_label(m, data, variant) for m in set(reference["model"]) for data in ("IN-1K", "IN-22K")
                     for variant in set(mapping["variant"])})
    paper = paper_values(reference, mapping, models)  # raises if a line matches several rows
    with_table = mapping[mapping["paper_table"] != ""]
    resolved = set(zip(paper["group"], paper["column"]))
    unresolved = [(g, c) for g, c in zip(with_table["group"], with_table["column"]) if (g, c) not in resolved]
    assert not unresolved, f"mapping lines matching no reference row: {unresolved}"
    vit_s = paper[paper["paper_model"] == "ViT-S/16"].set_index("column")["paper_value"]
    assert vit_s["k-NN"] == 75.2 and vit_s["Linear"] == 77.9 and vit_s["Fine-tune"] == 82.3
    assert vit_s["IN-C err (19)"] == 48.1 and vit_s["S.5"] == 65.9 and vit_s["Only-BG-T"] == 17.4
    assert "mIoU (linear)" not in vit_s.index  # the paper has no ViT-S/16 linear-seg number
    assert paper[paper["paper_model"] == "ViT-L/16"].set_index("column").at["Linear", "paper_value"] == 81.0
    # a label sees only the lines of its pretraining data and variant
    in22k = paper[paper["paper_model"] == "ViT-B/16, IN-22K"].set_index("column")["paper_value"]
    assert in22k["k-NN"] == 71.1 and in22k["Linear"] == 79.0 and in22k["Fine-tune"] == 84.4  # Tab.15, Tab.3
    no_mc = paper[paper["paper_model"] == "ViT-S/16, no multi-crop"].set_index("column")["paper_value"]
    assert no_mc.to_dict() == {"k-NN": 72.4, "Linear": 76.2}  # Tab.10, nothing else
    assert paper[paper["paper_model"] == "ViT-L/16, IN-22K, FT 512"]["paper_value"].tolist() == [87.8]


def test_paper_labels_round_trip():
    assert paper_label("ViT-B/16") == "ViT-B/16" and paper_label(None, "IN-22K") is None
    assert paper_label("ViT-L/16", "IN-22K", "FT 512") == "ViT-L/16, IN-22K, FT 512"
    for label in ("ViT-S/16", "DINO ViT-S/16, no multi-crop", "ViT-L/16, IN-22K, FT 512", "ViT-B/16 (random mask)"):
        assert paper_label(*parse_paper_label(label)) == label
    assert parse_paper_label("ViT-S/16, no multi-crop") == ("ViT-S/16", "IN-1K", "no multi-crop")


def test_paper_protocols_name_every_paper_experiment_we_can_run():
    """Every (paper model, stage) with a paper number for a ViT we can evaluate has the dataset and
    protocol labels of the paper's experiment, and every such row has a paper number."""
    reference, mapping, experiments = load_reference(), load_metric_map(), load_paper_protocols()
    standard = {m for m in set(reference["model"]) if m.removeprefix("DINO ").startswith("ViT-") and "(" not in m}
    models = sorted(standard | set(_paper_labels().values()))  # + the variants config/paper.yaml runs
    joinable = set(map(tuple, paper_values(reference, mapping, models)[["paper_model", "stage"]].values))
    listed = set(zip(experiments["paper_model"], experiments["stage"]))
    # DINO fine-tuning, transfer and semi-supervised: no source says which recipe the DINO numbers
    # came from (DINO's own paper or iBOT's): no join
    transfer = {s for s in STAGES if s.startswith("transfer_")}
    unknown = {("DINO ViT-S/16", "finetune"), ("DINO ViT-B/16", "finetune"), ("DINO ViT-S/16", "semi_supervised"),
               ("DINO ViT-S/16", "unsupervised")}
    unknown |= {(f"DINO {arch}", stage) for arch in ("ViT-S/16", "ViT-B/16") for stage in transfer}
    assert joinable - listed == unknown
    assert listed <= joinable
    assert PAPER_PROTOCOLS_CSV.parent == REFERENCE_CSV.parent


def _paper_labels() -> dict[str, str]:
    """model -> paper label of every model of config/paper.yaml."""
    from ibot.config import load_yaml, validate_config
    from ibot.results.aggregate import models_info_from_config
    config = validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO)
    return {model: info["paper_model"] for model, info in models_info_from_config(config).items() if info["paper_model"]}


def _paper_stage_config(stage: str, model: str) -> tuple[dict, dict]:
    from ibot.config import load_yaml, model_spec, stage_config, validate_config
    config = validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO)
    return stage_config(config, stage, model), model_spec(config, model)


#: Stages whose module builds its protocol label with ``protocol_label(config)`` (checked against
#: paper_protocols.csv for the paper config of every model).
LABELLED_STAGES = {"knn": "downstream.knn", "linear": "downstream.linear", "finetune": "downstream.finetune",
                   "detection": "downstream.dense.detection", "seg_upernet": "downstream.dense.segmentation",
                   "seg_linear": "downstream.dense.segmentation"}


@pytest.mark.parametrize("stage", sorted(LABELLED_STAGES))
def test_the_paper_config_writes_the_paper_protocol_labels(stage):
    import importlib
    module = importlib.import_module(LABELLED_STAGES[stage])
    experiments = load_paper_protocols()
    rows = experiments[(experiments["stage"] == stage) & ~experiments["paper_model"].str.startswith("DINO ")]
    assert len(rows), stage
    paper_models = {label: model for model, label in reversed(list(_paper_labels().items()))}  # first model wins
    for row in rows.itertuples(index=False):
        config, _ = _paper_stage_config(stage, paper_models[row.paper_model])
        assert module.protocol_label(config) == row.protocol, (stage, row.paper_model)


@pytest.mark.parametrize("stage", ["imagenet_c", "imagenet_a", "bg_challenge"])
def test_robustness_labels_name_the_paper_linear_head(stage):
    """A robustness number joins the paper's only when its head came from the paper's linear protocol."""
    from downstream import linear
    from downstream.robustness.common import robustness_protocol
    experiments = load_paper_protocols()
    rows = experiments[(experiments["stage"] == stage) & ~experiments["paper_model"].str.startswith("DINO ")]
    assert len(rows), stage
    for row in rows.itertuples(index=False):
        config, _ = _paper_stage_config("linear", {"ViT-S/16": "vit_small"}[row.paper_model])
        assert robustness_protocol({"protocol": linear.protocol_label(config)}) == row.protocol, stage


def test_occlusion_joins_the_paper_only_with_the_official_protocol_and_dino_saliency():
    """The paper config pointed at DINO's released ViT-S/16 (the official protocol) writes exactly the
    paper row's label; the self-attention variant and another saliency model never join it."""
    from downstream import linear
    from downstream.robustness import occlusion
    experiments = load_paper_protocols()
    paper = experiments[(experiments["stage"] == "occlusion") & (experiments["paper_model"] == "ViT-S/16")]
    head = {"protocol": linear.protocol_label(_paper_stage_config("linear", "vit_small")[0])}
    config, _ = _paper_stage_config("occlusion", "vit_small")
    dino = {**config, "saliency_model": {**config["saliency_model"],
                                          "checkpoint": f"/weights/{occlusion.DINO_VITS16_FILE}"}}
    assert occlusion.protocol_label(dino, head) == paper["protocol"].item()
    assert occlusion.protocol_label({**dino, "protocol": "self_attention"}, head) != paper["protocol"].item()
    assert occlusion.protocol_label(config, head) != paper["protocol"].item()  # saliency checkpoint unset


def test_a_real_paper_run_refuses_an_unset_saliency_checkpoint_before_any_job():
    from ibot.config import ConfigError, check_stage_configs, load_yaml, validate_config
    config = validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO)
    with pytest.raises(ConfigError, match=r"models.vit_small x occlusion: .*saliency_model.checkpoint"):
        check_stage_configs(config)
    config["robustness"]["occlusion"]["saliency_model"]["checkpoint"] = "/weights/dino_deitsmall16_pretrain.pth"
    check_stage_configs(config)


# -- summary ----------------------------------------------------------------------------------------
def test_summary_rows_deltas_and_empty_paper_cells():
    summary = _summary("seed0")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == 21  # one row per metric of every fixture file
    knn = summary[(summary["model"] == "vit_small") & (summary["metric"] == "top1_k20")].iloc[0]
    assert knn["paper_value"] == 75.2 and math.isclose(knn["delta"], 74.8 - 75.2)
    assert knn["seed"] == 0 and knn["checkpoint_sha256"] == "0" * 64 and knn["column"] == "k-NN"
    err = summary[summary["metric"] == "mean_error_19"].iloc[0]
    assert err["paper_value"] == 48.1 and not err["higher_is_better"]
    for metric in ("mCE_alexnet_15", "bg_gap", "random_0.5", "top1_k10"):
        assert summary[summary["metric"] == metric]["paper_value"].isna().all(), metric
    tiny = summary[summary["model"] == "vit_tiny"]
    assert tiny["paper_value"].isna().all() and tiny["delta"].isna().all()


def test_summary_cli_writes_csv_and_flat_metrics(tmp_path):
    out, flat = tmp_path / "summary.csv", tmp_path / "metrics_flat.json"
    files = [str(p) for p in find_metrics_files(FIXTURES / "seed1")]
    results_main(["summary", "--models-json", json.dumps(INFO), "--seed", "7", "--out", str(out),
                  "--flat", str(flat), *files])
    back = read_summaries([out])
    assert len(back) == 19 and set(back["run"]) == {"seed1"}  # no detection in seed1
    nested = json.loads(flat.read_text())
    assert nested["vit_small"]["knn"]["top1_k20"] == pytest.approx(75.2)
    assert nested == flat_metrics(back)
    results_main(["summary", "--out", str(tmp_path / "empty.csv")])  # no stage enabled: header only
    assert list(pd.read_csv(tmp_path / "empty.csv").columns) == SUMMARY_COLUMNS


def test_duplicate_records_are_refused(tmp_path):
    a = FIXTURES / "seed0" / "vit_tiny" / "knn" / "metrics.json"
    shutil.copy(a, tmp_path / "metrics.json")
    with pytest.raises(ValueError, match="several metrics files"):
        build_summary([a, tmp_path / "metrics.json"], INFO)


def _copy_record(tmp_path: Path, source: Path, run: str, **changes) -> Path:
    record = json.loads(source.read_text())
    record.update(run=run, **changes)
    out = tmp_path / run / record["model"] / record["stage"] / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))
    return out


def test_paper_numbers_join_only_the_paper_protocol(tmp_path):
    """A shortened schedule (or another dataset) is not the paper's experiment: no paper value, no
    delta, a † in the tables; the same model's paper-protocol rows keep theirs."""
    det = FIXTURES / "seed0" / "vit_small" / "detection" / "metrics.json"
    knn = FIXTURES / "seed0" / "vit_small" / "knn" / "metrics.json"
    short = _copy_record(tmp_path, det, "short", protocol="cascade-mask-rcnn,2ep,steps=2,scales=96-128/128")
    subset = _copy_record(tmp_path, knn, "short", dataset="imagenet")  # a 10-class folder, not ImageNet-1K
    summary = build_summary([short, subset, FIXTURES / "seed0" / "vit_small" / "linear" / "metrics.json"], INFO)
    rows = summary.set_index("metric")
    for metric in ("bbox_AP", "segm_AP", "top1_k20"):
        assert not rows.at[metric, "is_paper_protocol"], metric
        assert pd.isna(rows.at[metric, "paper_value"]) and pd.isna(rows.at[metric, "delta"]), metric
    assert rows.at["bbox_AP", "paper_protocol"] == "cascade-mask-rcnn,1x" and rows.at["top1_k20", "paper_dataset"] == \
        "imagenet-1k"
    assert rows.at["top1", "is_paper_protocol"] and rows.at["top1", "paper_value"] == 77.9
    table = group_table(aggregate(summary), "dense")
    assert _row(table, "ours: vit_small")["APb"]["off_protocol"]
    assert _row(table, "Δ vit_small − paper")["APb"]["mean"] is None  # no Δ against the paper's 1x
    md = to_markdown(table)
    assert "48.9†" in md and "not the paper's protocol" in md
    classification = group_table(aggregate(summary), "classification")
    assert _row(classification, "Δ vit_small − paper")["k-NN"]["mean"] is None
    assert math.isclose(_row(classification, "Δ vit_small − paper")["Linear"]["mean"], 77.5 - 77.9)
    assert compare_paper(summary).set_index("metric").index.tolist() == ["top1"]
    # runs of two protocols are never pooled into one cell
    both = pd.concat([summary, _summary("seed0")], ignore_index=True)
    with pytest.raises(ValueError, match="several datasets or protocols"):
        group_table(aggregate(both), "dense")


def test_a_rescaled_pretraining_is_marked_in_summary_and_tables():
    """pretrain.batch_rescale: the model's rows carry the note, its table row a ‡ with the note below."""
    from ibot.config import load_yaml, validate_config
    from ibot.results.aggregate import models_info_from_config

    config = load_yaml(REPO / "config" / "paper.yaml")
    del config["models"]["vit_large"]["resources"]  # 16 GPUs x 16 = 256 instead of the recipe's 1024
    config["models"]["vit_large"]["overrides"] = {"pretrain": {"batch_rescale": True}}
    info = models_info_from_config(validate_config(config, base_dir=REPO))
    assert info["vit_large"]["pretrain_note"] == "global batch 256 (recipe 1024), lr rescaled"
    assert info["vit_small"]["pretrain_note"] == ""
    summary = build_summary(find_metrics_files(FIXTURES / "seed0"), {**INFO, "vit_small": {
        **INFO["vit_small"], "pretrain_note": info["vit_large"]["pretrain_note"]}})
    assert set(summary[summary["model"] == "vit_small"]["pretrain_note"]) == {"global batch 256 (recipe 1024), lr rescaled"}
    table = group_table(aggregate(summary), "classification")
    _row(table, "ours: vit_small ‡")
    assert any("vit_small: global batch 256 (recipe 1024), lr rescaled" in note for note in table.attrs["notes"])
    assert "‡" in to_markdown(table)


def test_null_metrics_need_a_reason_and_show_as_n_a(tmp_path):
    base = dict(run="r", model="vit_small", stage="detection", task="detection", dataset="coco",
                protocol="cascade-mask-rcnn,1x", config={}, wall_time_s=1.0)
    with pytest.raises(ValueError, match="without a reason"):
        write_metrics(tmp_path / "a.json", metrics={"bbox_AP": None}, **base)
    with pytest.raises(ValueError, match="not finite"):
        write_metrics(tmp_path / "a.json", metrics={"bbox_AP": float("nan")}, **base)
    with pytest.raises(ValueError, match="not null"):
        write_metrics(tmp_path / "a.json", metrics={"bbox_AP": 1.0}, null_reasons={"bbox_AP": "x"}, **base)
    path = tmp_path / "r" / "vit_small" / "detection" / "metrics.json"
    reason = "mmdet CocoMetric produced no coco/segm_mAP: no detection"
    write_metrics(path, metrics={"bbox_AP": 12.5, "segm_AP": None}, null_reasons={"segm_AP": reason}, **base)
    record = json.loads(path.read_text())
    assert record["metrics"]["segm_AP"] is None and record["extra"]["null_reasons"] == {"segm_AP": reason}
    broken = dict(record, extra={})
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="without a reason"):
        build_summary([tmp_path / "broken.json"], INFO)

    summary = build_summary([path], INFO)
    row = summary.set_index("metric").loc["segm_AP"]
    assert pd.isna(row["value"]) and row["null_reason"] == reason and pd.isna(row["delta"])
    assert flat_metrics(summary) == {"vit_small": {"detection": {"bbox_AP": 12.5}}}  # DVC metrics: numbers only
    summary.to_csv(tmp_path / "summary.csv", index=False)
    agg = aggregate(read_summaries([tmp_path / "summary.csv"]))
    assert agg.set_index("metric").at["segm_AP", "n"] == 0
    table = group_table(agg, "dense")
    ours = _row(table, "ours: vit_small")
    md = to_markdown(table)
    assert "n/a" in md and "12.5" in md and "evaluator produced no value" in md
    assert ours["APm"]["mean"] is None or pd.isna(ours["APm"]["mean"])
    assert _row(table, "Δ vit_small − paper")["APm"]["mean"] is None
    write_tables(agg, tmp_path / "tables")
    assert pd.isna(pd.read_csv(tmp_path / "tables" / "dense.csv").set_index("Method").at["ours: vit_small", "APm"])
    assert "n/a" in (tmp_path / "tables" / "all_metrics.md").read_text()


# -- tables -----------------------------------------------------------------------------------------
def test_tables_pool_seeds_with_mean_std_n_and_paper_rows():
    agg = _pooled()
    knn = agg[(agg["model"] == "vit_small") & (agg["metric"] == "top1_k20")].iloc[0]
    assert knn["n"] == 2 and math.isclose(knn["mean"], 75.0) and math.isclose(knn["std"], math.sqrt(0.08))
    table = group_table(agg, "classification")
    md = to_markdown(table)
    ours = _row(table, "ours: vit_small")
    assert ours["k-NN"]["n"] == 2 and ours["Fine-tune"]["mean"] is None  # finetune did not run
    assert "75.0 ± 0.3 (n=2)" in md and "77.7 ± 0.3 (n=2)" in md
    assert _row(table, "iBOT")["k-NN"]["mean"] == 75.2 and _row(table, "DINO")["Linear"]["mean"] == 77.0
    assert math.isclose(_row(table, "Δ vit_small − paper")["k-NN"]["mean"], -0.2)
    tiny = _row(table, "ours: vit_tiny")
    assert tiny["Arch"] == "vit_tiny" and tiny["Linear"]["mean"] is None

    dense = group_table(agg, "dense")
    ours = _row(dense, "ours: vit_small")
    assert ours["APb"]["n"] == 1 and ours["mIoU (UperNet)"]["mean"] is None  # detection ran in one seed only
    assert "48.9 (n=1)" in to_markdown(dense)
    assert "DINO" not in set(dense["Method"])  # no DINO ViT-S/16 dense numbers in the paper

    robust = group_table(agg, "robustness")
    assert math.isclose(_row(robust, "Δ vit_small − paper")["IN-C err (19)"]["mean"], 48.8 - 48.1)
    assert _row(robust, "iBOT")["IN-C mCE (15)"]["mean"] is None  # not reported: empty, not derived
    assert _row(robust, "iBOT")["BG-Gap"]["mean"] is None


def test_missing_stages_never_invent_numbers():
    agg = aggregate(build_summary([FIXTURES / "seed0" / "vit_tiny" / "knn" / "metrics.json"], INFO))
    for group in GROUPS:
        table = group_table(agg, group)
        assert list(table["Method"]) == ["ours: vit_tiny"]  # no paper model: no paper rows
        values = [c["mean"] for col in table.attrs["columns"] for c in table[col]]
        assert values == ([31.0] + [None] * (len(values) - 1) if group == "classification" else [None] * len(values))
        row = [line for line in to_markdown(table).splitlines() if line.startswith("| ours")][0]
        cells = [c.strip() for c in row.split("|")[4:-1]]  # after Method | Arch | Source
        assert cells == (["31.0"] + [""] * (len(cells) - 1) if group == "classification" else [""] * len(cells))


def _check_markdown(text: str) -> None:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3
    counts = {line.count("|") for line in lines}
    assert len(counts) == 1, f"ragged markdown table: {counts}"
    assert re.fullmatch(r"\|(:?-+:?\|)+", lines[1].replace(" ", ""))


def _check_latex(text: str) -> None:
    assert text.count(r"\begin{tabular}") == 1 and text.count(r"\end{tabular}") == 1
    spec = re.search(r"\\begin\{tabular\}\{([lrc|]+)\}", text).group(1).replace("|", "")
    body = text.split(r"\begin{tabular}", 1)[1].split(r"\end{tabular}", 1)[0]
    rows = [r.strip() for r in body.split("\n") if r.strip().endswith(r"\\")]
    assert rows, "no tabular rows"
    for row in rows:
        cells = re.split(r"(?<!\\)&", row[: -2])
        assert len(cells) == len(spec), f"{len(cells)} cells for spec {spec!r}: {row}"
    for env in ("table", "tabular"):
        assert text.count(rf"\begin{{{env}}}") == text.count(rf"\end{{{env}}}")
    assert text.count("$") % 2 == 0 and "±" not in text and "_" not in text.replace(r"\_", "")


def test_markdown_latex_csv_html_outputs_parse(tmp_path):
    agg = _pooled()
    written = write_tables(agg, tmp_path)
    assert {p.name for p in written} >= {f"{g}.{e}" for g in GROUPS for e in ("md", "csv", "tex", "html")}
    for group in GROUPS:
        _check_markdown((tmp_path / f"{group}.md").read_text())
        _check_latex((tmp_path / f"{group}.tex").read_text())
        html = (tmp_path / f"{group}.html").read_text()
        assert html.count("<tr") == len(group_table(agg, group)) + 1
        csv = pd.read_csv(tmp_path / f"{group}.csv")
        assert len(csv) == len(group_table(agg, group))
    csv = pd.read_csv(tmp_path / "classification.csv").set_index("Method")
    assert csv.at["ours: vit_small", "k-NN"] == pytest.approx(75.0) and csv.at["ours: vit_small", "k-NN n"] == 2
    assert pd.isna(csv.at["ours: vit_small", "Fine-tune"])
    _check_markdown((tmp_path / "all_metrics.md").read_text())
    _check_latex(to_latex(group_table(agg, "robustness")))


def test_tables_cli_pools_several_summaries(tmp_path):
    paths = []
    for run in ("seed0", "seed1"):
        paths.append(tmp_path / f"{run}.csv")
        _summary(run).to_csv(paths[-1], index=False)
    results_main(["tables", *map(str, paths), "--out-dir", str(tmp_path / "tables"), "--formats", "md"])
    assert "(n=2)" in (tmp_path / "tables" / "classification.md").read_text()


# -- comparison -------------------------------------------------------------------------------------
def test_compare_runs_and_paper(tmp_path, capsys):
    diff = compare_runs(_summary("seed0"), _summary("seed1"))
    row = diff[(diff["model"] == "vit_small") & (diff["metric"] == "top1_k20")].iloc[0]
    assert math.isclose(row["delta"], 0.4)
    det = diff[diff["stage"] == "detection"]
    assert det["mean_B"].isna().all() and det["delta"].isna().all()  # missing in B: empty, no delta
    paper = compare_paper(pd.concat([_summary("seed0"), _summary("seed1")]))
    assert set(paper["model"]) == {"vit_small"} and paper["paper_value"].notna().all()
    assert math.isclose(paper.set_index("metric").at["top1_k20", "delta"], -0.2)

    for run in ("seed0", "seed1"):
        (tmp_path / run).mkdir()
        _summary(run).to_csv(tmp_path / run / "summary.csv", index=False)
    results_main(["compare", "seed0", "seed1", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    _check_markdown(out)
    assert "+0.40" in out
    results_main(["compare", "seed0,seed1", "--paper", "--results-dir", str(tmp_path), "--out",
                  str(tmp_path / "vs_paper.csv")])
    vs = pd.read_csv(tmp_path / "vs_paper.csv")
    assert (vs["n"] >= 1).all() and vs.set_index("metric").at["top1_k20", "n"] == 2


# -- plots ------------------------------------------------------------------------------------------
def test_plots_from_fixture_side_files_and_without_any(tmp_path):
    from ibot.results.plots import CURVE_SETS, PLOT_FILES, make_plots

    paths = make_plots([FIXTURES / "seed0", FIXTURES / "seed1"], _pooled(), tmp_path / "plots",
                       curves_dir=tmp_path / "curves")
    assert sorted(p.name for p in paths) == sorted(PLOT_FILES)
    assert all(p.stat().st_size > 5000 for p in paths)
    for name, columns in CURVE_SETS.items():
        curves = pd.read_csv(tmp_path / "curves" / name / "pretrain_seed0_vit_small.csv")
        assert list(curves.columns) == ["epoch", "iteration", *columns] and len(curves) == 40
    empty = make_plots([tmp_path / "no_such_run"], aggregate(pd.DataFrame()), tmp_path / "empty")
    assert all(p.is_file() for p in empty)  # every figure exists, panels say "no data"


def test_attention_figure_from_exported_checkpoint(tmp_path):
    import numpy as np
    from PIL import Image

    from ibot.checkpoint import export_backbone
    from ibot.models.vision_transformer import build_backbone
    from ibot.results.attention import attention_maps, find_images

    for i, cls in enumerate(("n01", "n02", "n03")):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.fromarray((np.random.RandomState(i).rand(40, 52, 3) * 255).astype("uint8")).save(
            tmp_path / "val" / cls / "a.png")
    export_backbone(build_backbone("vit_tiny", depth=1, masked_im_modeling=False), tmp_path / "teacher.pth",
                    {"arch": "vit_tiny"})
    images = find_images(tmp_path, 2)
    assert [p.parent.name for p in images] == ["n01", "n02"]
    spec = {"arch": "vit_tiny", "patch_size": 16, "depth": 1}
    pixels, maps = attention_maps(spec, tmp_path / "teacher.pth", images, img_size=64)
    assert pixels.shape == (2, 64, 64, 3) and maps.shape == (2, 3, 4, 4)
    sums = maps.sum(axis=(2, 3))  # softmax over [CLS] + patches: the patch share is below 1
    assert ((sums > 0.5) & (sums < 1.0)).all()
    results_main(["attention", "--checkpoint", str(tmp_path / "teacher.pth"), "--arch", "vit_tiny", "--depth", "1",
                  "--images", str(tmp_path), "--num-images", "2", "--img-size", "64", "--out", str(tmp_path / "a.png")])
    assert (tmp_path / "a.png").stat().st_size > 1000


# -- DVC --------------------------------------------------------------------------------------------
def test_dvc_lock_serialises_callers(tmp_path):
    from ibot.results.dvc_tools import dvc_lock

    (tmp_path / ".dvc").mkdir()
    held = threading.Event()

    def holder():
        with dvc_lock(tmp_path):
            held.set()
            time.sleep(0.6)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    start = time.monotonic()
    with dvc_lock(tmp_path):
        waited = time.monotonic() - start
    thread.join()
    assert waited > 0.3


_TINY_SNAKEFILE = '''
rule all:
    input: "results/embedded/vit_tiny/knn/metrics.json"

rule embedded_data:
    output: "results/data/embedded/imagenet.complete"
    shell: "echo data > {output}"

rule pretrain:
    input: "results/data/embedded/imagenet.complete"
    output:
        backbone="results/embedded/vit_tiny/pretrain/teacher_backbone.pth",
        summary="results/embedded/vit_tiny/pretrain/summary.json",
        curves="results/embedded/vit_tiny/pretrain/train_log.csv",
    shell: "head -c 200000 /dev/urandom > {output.backbone}; echo '{{}}' > {output.summary}; printf 'iteration,loss\\\\n0,1\\\\n' > {output.curves}"

rule knn:
    input: "results/embedded/vit_tiny/pretrain/teacher_backbone.pth", "results/data/embedded/imagenet.complete"
    output: "results/embedded/vit_tiny/knn/metrics.json"
    shell: "echo '{{}}' > {output}"
'''
# What the project's .gitignore must say: results are ignored except the *.dvc pointers, the
# reference and the small text results (the summary, DVC metrics, tables, dvc-plots curves).
_GITIGNORE = """/.snakemake/
/results/**
!/results/**/
!/results/**/*.dvc
!/results/reference/**
!/results/*/summary.csv
!/results/*/metrics_flat.json
!/results/*/tables/**
!/results/*/curves/**
"""


def _sh(cmd, cwd, stdout_only=False, **kwargs):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def _planned(cwd) -> set[str]:
    out = _sh([str(BIN / "snakemake"), "-n", "--quiet", "rules"], cwd)
    return set(re.findall(r"^(\w+)\s+\d+$", out, flags=re.M)) - {"total", "job"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dvc_round_trip_restores_checkpoint_without_pretraining_rerun(tmp_path):
    # dvc and snakemake are pinned dependencies (pyproject.toml), git holds the project: missing is a failure
    assert (BIN / "dvc").is_file() and (BIN / "snakemake").is_file(), f"dvc/snakemake not installed in {BIN}"
    assert shutil.which("git") is not None, "git not found"
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    (repo / "Snakefile").write_text(_TINY_SNAKEFILE)
    (repo / ".gitignore").write_text(_GITIGNORE)
    _sh(["git", "init", "-q"], repo)
    _sh([str(BIN / "dvc"), "init", "-q"], repo)
    _sh([str(BIN / "snakemake"), "-c1", "-q"], repo)
    checkpoint = "results/embedded/vit_tiny/pretrain/teacher_backbone.pth"
    original = (repo / checkpoint).read_bytes()

    py = [sys.executable, "-m", "ibot.results"]
    out = _sh(py + ["dvc-track"], repo)  # every output of the pretrain jobs, found via snakemake --summary
    assert sorted(p.name for p in (repo / checkpoint).parent.glob("*.dvc")) == [
        "summary.json.dvc", "teacher_backbone.pth.dvc", "train_log.csv.dvc"], out
    _sh([str(BIN / "dvc"), "remote", "add", "-d", "local", str(remote)], repo)
    _sh(py + ["dvc-push"], repo)
    # the project's dvc.yaml: run metrics and pretraining curves as DVC sees them
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    (repo / "results/embedded/metrics_flat.json").write_text('{"vit_tiny": {"knn": {"top1_k20": 31.5}}}')
    (repo / "results/embedded/curves/loss").mkdir(parents=True)
    (repo / "results/embedded/curves/loss/pretrain_vit_tiny.csv").write_text(
        "epoch,iteration,loss,cls,patch\n0,0,9.0,5.0,4.0\n0,1,8.5,4.8,3.7\n")
    metrics = json.loads(_sh([str(BIN / "dvc"), "metrics", "show", "--json"], repo, stdout_only=True))
    assert metrics[""]["data"]["results/embedded/metrics_flat.json"]["data"] == {"vit_tiny": {"knn": {"top1_k20": 31.5}}}
    plots = json.loads(_sh([str(BIN / "dvc"), "plots", "show", "--json"], repo, stdout_only=True))
    loss = plots["data"]["results/embedded/curves/loss/pretrain_vit_tiny.csv"][0]["content"]
    assert len(loss["data"]["values"]) == 6  # 2 iterations x (loss, cls, patch)

    _sh(["git", "add", "-A"], repo)
    _sh(["git", "commit", "-qm", "results"], repo)
    tracked = _sh(["git", "ls-files"], repo, stdout_only=True).split()
    assert checkpoint + ".dvc" in tracked and checkpoint not in tracked
    assert {"dvc.yaml", "results/embedded/metrics_flat.json", "results/embedded/curves/loss/pretrain_vit_tiny.csv"} <= set(tracked)
    assert "results/embedded/vit_tiny/knn/metrics.json" not in tracked

    clone = tmp_path / "clone"  # fresh clone: no cache, no data, no checkpoint, no .snakemake
    _sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / checkpoint).exists() and not (clone / ".dvc" / "cache").exists()
    _sh([str(BIN / "dvc"), "pull", "-q"], clone)  # plain pull: regenerated data would retrain
    assert (clone / checkpoint).read_bytes() == original
    assert "pretrain" in _planned(clone)

    out = _sh(py + ["dvc-pull"], clone, stdout_only=True)  # the helper: pull, build missing upstream, --touch
    result = json.loads(out[out.index("{"):])
    assert checkpoint in result["touched"] and result["upstream"] == ["results/data/embedded/imagenet.complete"]
    assert (clone / checkpoint).read_bytes() == original
    assert _planned(clone) == {"knn", "all"}  # nothing upstream of the stage is planned


# -- Snakemake rules and report ---------------------------------------------------------------------
_STUB = '''"""Stand-ins for the real rules (test only): embedded images, pretraining, stages."""
import json, shutil, sys
from pathlib import Path

def data(out_complete):
    import numpy as np
    from PIL import Image
    root = Path(out_complete).with_suffix("")
    for i, cls in enumerate(("n01", "n02")):
        (root / "val" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.RandomState(i).rand(40, 56, 3) * 255).astype("uint8")).save(root / "val" / cls / "a.png")
    Path(out_complete).write_text("ok\\n")

def pretrain(weights, backbone, summary, curves, log):
    shutil.copy(weights, backbone)  # an exported vit_tiny (depth 1) made by the test
    Path(summary).write_text("{}\\n")
    shutil.copy(log, curves)

def stage(fixture, out, run, model):
    src, dst = Path(fixture), Path(out).parent
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "metrics.json":
            shutil.copy(f, dst / f.name)
    record = json.loads((src / "metrics.json").read_text())
    record.update(run=run, model=model)
    Path(out).write_text(json.dumps(record))

if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
'''

# The real workflow/rules/common.smk (the helper API results.smk uses), stub stage rules, the real results.smk.
_SNAKEFILE = '''
include: "COMMON_SMK"

FIXTURES = config["fixtures"]


rule embedded_data:
    output: f"{config['data']['embedded']['root']}/imagenet.complete"
    shell: "{PYTHON:q} stub.py data {output:q}"


rule pretrain:
    input: dataset_ready("imagenet")
    output:
        backbone=f"{RESULTS}/{RUN}/{{model}}/pretrain/teacher_backbone.pth",
        summary=f"{RESULTS}/{RUN}/{{model}}/pretrain/summary.json",
        curves=f"{RESULTS}/{RUN}/{{model}}/pretrain/train_log.csv",
    shell: "{PYTHON:q} stub.py pretrain weights.pth {output.backbone:q} {output.summary:q} "
           "{output.curves:q} {FIXTURES}/seed0/vit_small/pretrain/train_log.csv"


rule stage:
    input: checkpoint=backbone_checkpoint, data=dataset_ready("imagenet")
    output: f"{RESULTS}/{RUN}/{{model}}/{{stage}}/metrics.json"
    wildcard_constraints: stage="|".join(STAGES)
    params: fixture=lambda w: f"{FIXTURES}/seed0/{config['models'][w.model]['fixture']}/{w.stage}"
    shell: "{PYTHON:q} stub.py stage {params.fixture:q} {output:q} {RUN} {wildcards.model}"


include: "RESULTS_SMK"


rule all:
    default_target: True
    input: all_targets()
'''

_CONFIG = {
    "run": "embedded", "results_dir": "results", "seed": 0,
    "stages": ["knn", "linear", "detection", "imagenet_c", "bg_challenge", "occlusion"],
    "data": {"embedded": {"root": "data", "generate": True}, "imagenet": "data/imagenet"},
    "models": {
        "vit_small": {"arch": "vit_tiny", "patch_size": 16, "depth": 1, "weights": "pretrain",
                      "paper_model": "ViT-S/16", "fixture": "vit_small"},
        "vit_tiny": {"arch": "vit_tiny", "patch_size": 16, "depth": 1, "weights": "random", "paper_model": None,
                     "fixture": "vit_tiny", "stages": ["knn"]},
    },
}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_results_rules_rebuild_on_metrics_change_and_report_builds(tmp_path):
    assert (BIN / "snakemake").is_file(), f"snakemake (pinned in pyproject.toml) not installed in {BIN}"
    (tmp_path / "Snakefile").write_text(_SNAKEFILE.replace("RESULTS_SMK", str(REPO / "workflow/rules/results.smk"))
                                        .replace("COMMON_SMK", str(REPO / "workflow/rules/common.smk")))
    (tmp_path / "stub.py").write_text(_STUB)
    (tmp_path / "config.yaml").write_text(json.dumps({**_CONFIG, "fixtures": str(FIXTURES)}))
    from ibot.checkpoint import export_backbone
    from ibot.models.vision_transformer import build_backbone

    export_backbone(build_backbone("vit_tiny", depth=1, masked_im_modeling=False), tmp_path / "weights.pth", {})
    smk = [str(BIN / "snakemake"), "--configfile", "config.yaml"]
    _sh(smk + ["-c2", "-q"], tmp_path)
    run = tmp_path / "results" / "embedded"
    for rel in ("summary.csv", "metrics_flat.json", "tables/classification.md", "tables/robustness.tex",
                "plots/ours_vs_paper.png", "curves/loss/pretrain_vit_small.csv", "figures/attention_vit_small.png",
                "figures/attention_vit_tiny.png"):
        assert (run / rel).is_file(), rel
    summary = pd.read_csv(run / "summary.csv")
    # 15 paper values of the ViT-S fixtures less occlusion S.5/NS.5: our occlusion is not the paper protocol
    assert set(summary["run"]) == {"embedded"} and summary["paper_value"].notna().sum() == 13
    assert "| 74.8 " in (run / "tables" / "classification.md").read_text()
    assert _planned_with(smk, tmp_path) == set()

    _sh(smk + ["--report", "report.html"], tmp_path)
    html = (tmp_path / "report.html").read_text()
    for text in ("ours_vs_paper.png", "attention_vit_small.png", "classification.html", "Robustness of the linear head",
                 "iBOT reproduction"):
        assert text in html, text

    metrics = run / "vit_small" / "knn" / "metrics.json"  # a stage result changes: the results rebuild
    record = json.loads(metrics.read_text())
    record["metrics"]["top1_k20"] = 76.5
    metrics.write_text(json.dumps(record))
    assert _planned_with(smk, tmp_path) == {"summary", "tables", "plots", "all"}


def _planned_with(smk, cwd) -> set[str]:
    out = _sh(smk + ["-n", "--quiet", "rules"], cwd)
    return set(re.findall(r"^(\w+)\s+\d+$", out, flags=re.M)) - {"total", "job"}


# -- coverage -----------------------------------------------------------------------------------------
def test_coverage_claims_only_planned_jobs_and_says_why_not():
    from ibot.config import load_yaml, validate_config
    from ibot.results.coverage import coverage, ibot_rows

    config = validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO)
    everything = {f"results/paper/{m}/{s}/metrics.json" for m in config["models"]
                  for s in STAGES}
    full = coverage(config, everything)
    assert len(full) == len(ibot_rows(load_reference())) and not full["model"].str.startswith("DINO").any()
    covered = full[full["job"] != ""]
    assert (covered["reason"] == "").all() and (full[full["job"] == ""]["reason"] != "").all()
    row = full[(full["table"] == "Tab.14 det/seg ViT-B") & (full["metric"] == "APb50")].iloc[0]
    assert row["job"] == "results/paper/vit_base/detection/metrics.json (bbox_AP50)"
    in22k = full[(full["table"] == "Tab.15 IN-22K k-NN/linear") & (full["pretrain_data"] == "IN-22K")]
    assert in22k["job"].str.contains("_in22k/").all() and len(in22k) == 6
    ft512 = full[full["protocol"] == "FT 512"].iloc[0]
    assert ft512["job"] == "results/paper/vit_large_in22k_ft512/finetune/metrics.json (top1)"
    no_mc = full[full["protocol"] == "k-NN frozen, no multi-crop"]
    assert sorted(no_mc["job"]) == [f"results/paper/{m}_no_multicrop/knn/metrics.json (top1_k20)"
                                    for m in ("vit_base", "vit_small")]
    # without the variant models, their rows say what is missing
    config_wo = dict(config, models={m: e for m, e in config["models"].items()
                                     if not e.get("paper_variant") and e.get("pretrain_data") == "IN-1K"})
    reasons = set(coverage(config_wo, everything)["reason"])
    assert "no model with paper_model 'ViT-B/16' and pretrain_data IN-22K in this config" in reasons
    assert "no model with paper_model 'ViT-S/16' and paper_variant 'no multi-crop' in this config" in reasons
    # a job missing from the plan is never claimed
    partial = coverage(config, everything - {"results/paper/vit_base/seg_linear/metrics.json"})
    linear_seg = partial[(partial["table"] == "Tab.6 det/seg") & (partial["protocol"] == "linear head (frozen) 160k 512")]
    assert linear_seg["job"].tolist() == [""]
    assert linear_seg["reason"].tolist() == ["vit_base does not run seg_linear in this config"]
    assert len(partial[partial["job"] != ""]) == len(covered) - 3  # Tab.6 + Tab.14 mIoU, Tab.14 mAcc


def test_coverage_cli_reads_the_snakemake_plan(tmp_path):
    out = tmp_path / "coverage.md"
    result = subprocess.run([sys.executable, "-m", "ibot.results", "coverage", "--configfile", "config/paper.yaml",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\*\*\d+ of 119 iBOT numbers", result.stdout)
    assert "results/paper/vit_large/knn/metrics.json (top1_k20)" in out.read_text()
