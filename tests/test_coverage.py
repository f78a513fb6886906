"""Coverage: which of the paper's iBOT numbers the planned jobs of a config produce, and why the others
are not."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO
from ibot.results.aggregate import load_reference
from ibot.stages import STAGES


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
    # each planned number lists the unverified recipe values its job runs with (none for ViT-S/16)
    from ibot.config import planned_stages

    plan = coverage(config, {f"results/paper/{m}/{s}/metrics.json" for m in config["models"]
                             for s in planned_stages(config, m)})
    vit_s = plan[plan["job"].str.startswith("results/paper/vit_small/")]
    assert len(vit_s) > 40 and (vit_s["unverified"] == "").all()
    unsup = plan[plan["job"].str.contains("vit_small_out1000/unsupervised")]
    assert len(unsup) and (unsup["unverified"] == "pretrain.epochs").all()
    assert "pretrain.lr" in row["unverified"] and "pretrain.use_fp16" in ft512["unverified"]
    assert (full[full["job"] == ""]["unverified"] == "").all()


def test_coverage_cli_reads_the_snakemake_plan(tmp_path):
    out = tmp_path / "coverage.md"
    result = subprocess.run([sys.executable, "-m", "ibot.results", "coverage", "--configfile", "config/paper.yaml",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    split = re.search(r"\*\*(\d+) of 119 iBOT numbers .*: (\d+) with every recipe value cited, (\d+) with "
                      r"unverified values", result.stdout)
    assert split and int(split[1]) == int(split[2]) + int(split[3]) and int(split[3]) > 0, result.stdout[:500]
    assert "results/paper/vit_large/knn/metrics.json (top1_k20)" in out.read_text()
