"""Results from fixture metrics: the summary (paper values and deltas joined only on the paper's
protocol), tables in every output format, run/paper comparison, plots and the attention figure."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from helpers import FIXTURES, REPO
from ibot.results.__main__ import main as results_main
from ibot.metrics import write_metrics
from ibot.results.aggregate import (SUMMARY_COLUMNS, aggregate, build_summary, find_metrics_files, flat_metrics,
                                    read_summaries)
from ibot.results.compare import compare_paper, compare_runs
from ibot.results.tables import GROUPS, group_table, to_latex, to_markdown, write_tables

INFO = {"vit_small": {"paper_model": "ViT-S/16", "arch": "vit_small"},
        "vit_tiny": {"paper_model": None, "arch": "vit_tiny"}}


def _summary(run: str) -> pd.DataFrame:
    return build_summary(find_metrics_files(FIXTURES / run), INFO)


def _pooled() -> pd.DataFrame:
    return aggregate(pd.concat([_summary("seed0"), _summary("seed1")], ignore_index=True))


def _row(frame: pd.DataFrame, method: str) -> pd.Series:
    rows = frame[frame["Method"] == method]
    assert len(rows) == 1, (method, frame["Method"].tolist())
    return rows.iloc[0]


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


def test_unverified_recipe_values_are_marked_in_summary_and_tables():
    """A number computed with recipe values no offline source confirms carries them (per stage) in the
    summary, and its table row a § with the keys below."""
    from ibot.config import load_yaml, validate_config
    from ibot.results.aggregate import models_info_from_config

    info = models_info_from_config(validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO))
    assert info["vit_small"]["unverified"] == {}
    assert "pretrain.pred_ratio" in info["vit_base_rand_mask"]["unverified"]["knn"]
    assert info["vit_small_in22k"]["unverified"] == {"pretrain": "network", "knn": "network", "linear": "network"}
    marks = {"knn": "pretrain.lr, pretrain.min_lr", "linear": "pretrain.lr, pretrain.min_lr"}
    summary = build_summary(find_metrics_files(FIXTURES / "seed0"), {**INFO, "vit_small": {
        **INFO["vit_small"], "unverified": marks}})
    rows = summary[summary["model"] == "vit_small"].set_index("stage")
    assert rows.loc["knn", "unverified"].iloc[0] == "pretrain.lr, pretrain.min_lr"
    table = group_table(aggregate(summary), "classification")
    _row(table, "ours: vit_small §")
    assert any("vit_small: pretrain.lr, pretrain.min_lr" in note for note in table.attrs["notes"])
    plain = group_table(aggregate(build_summary(find_metrics_files(FIXTURES / "seed0"), INFO)), "classification")
    _row(plain, "ours: vit_small")


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


# -- README figures --------------------------------------------------------------------------------
def test_readme_block_is_written_from_the_run(tmp_path):
    """`ibot.results readme`: the paper-table metrics of a run's summary, per model, with the device and
    date of its records, between the README's markers (the rest of the file untouched)."""
    from ibot.results.readme import replace_block, write_readme_block

    run = tmp_path / "seed0"
    shutil.copytree(FIXTURES / "seed0", run)
    build_summary(find_metrics_files(run), INFO).to_csv(run / "summary.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- seed0:start -->\nold figures\n<!-- seed0:end -->\nrest\n")
    body = write_readme_block(run, readme)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- seed0:start -->\n| metric (stage) |") and text.endswith("<!-- seed0:end -->\nrest\n")
    assert "old figures" not in text and "| classification: k-NN (knn) | 74.8 |" in body
    assert "run `seed0`" in body and "2026-" in body
    with pytest.raises(ValueError, match="no <!-- other:start -->"):
        replace_block(text, "other", body)


def test_intervals_and_baselines_reach_summary_tables_and_readme(tmp_path):
    """A record's 95 % interval and trivial baseline: summary columns, "value [low, high]" cells and a
    "trivial baseline" row in the paper-style tables, and both in the README block."""
    from ibot.results.readme import write_readme_block
    from ibot.results.tables import BASELINE_ROW
    from ibot.uncertainty import baseline, interval

    knn = FIXTURES / "seed0" / "vit_tiny" / "knn" / "metrics.json"
    out = _copy_record(tmp_path, knn, "ev", intervals={"top1_k20": interval(30.25, 41.5, "wilson", 400)},
                       baselines={"top1_k20": baseline(10.0, "chance (1/10 balanced classes)")})
    summary = build_summary([out], INFO)
    row = summary[summary["metric"] == "top1_k20"].iloc[0]
    assert (row["ci_low"], row["ci_high"], row["ci_method"]) == (30.25, 41.5, "wilson")
    assert row["baseline"] == 10.0 and row["baseline_kind"].startswith("chance")
    assert summary[summary["metric"] == "top5_k20"]["baseline"].isna().all()  # only what the record carries
    frame = group_table(aggregate(summary), "classification")
    markdown = to_markdown(frame)
    value = f"{row['value']:.1f} [30.2, 41.5]"
    assert _row(frame, "ours: vit_tiny")["k-NN"]["interval"] == (30.25, 41.5) and value in markdown
    assert _row(frame, BASELINE_ROW)["k-NN"]["mean"] == 10.0
    assert "chance (1/10 balanced classes) (k-NN)" in markdown and "95 % interval" in markdown
    run = out.parents[2]
    summary.to_csv(run / "summary.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- ev:start -->\n<!-- ev:end -->\n")
    body = write_readme_block(run, readme)
    assert f"| classification: k-NN (knn) | {value} | 10.0 | chance (1/10 balanced classes) |" in body
