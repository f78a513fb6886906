"""``python -m ibot.results plan``: the cost of a config's jobs before launching them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ibot.config import load_workflow_config
from ibot.models.specs import VIT_ARCHITECTURES
from ibot.results.plan import (TAB19_SETTINGS, activation_factor, backbone_forward_flops, effective_flops_per_s,
                               format_plan, load_rates, plan, tab19_memory, vit_forward_flops)

ROOT = Path(__file__).resolve().parents[1]
PAPER = [str(ROOT / "config" / "paper.yaml")]


@pytest.mark.parametrize("arch,gmacs", [("vit_small", 4.6), ("vit_base", 17.6), ("vit_large", 61.6)])
def test_vit_flops_are_the_published_ones(arch, gmacs):
    """timm / DeiT report 4.6, 17.6 and 61.6 GMACs at 224 px for ViT-S/B/L with 16 px patches."""
    assert vit_forward_flops(VIT_ARCHITECTURES[arch], 224, 224, 16) / 2e9 == pytest.approx(gmacs, rel=0.03)


def test_vit_flops_equal_torchs_count_of_our_backbone():
    from ibot.models.vision_transformer import build_backbone

    backbone = build_backbone("vit_tiny", patch_size=8, img_size=64, depth=2).eval()
    backbone.set_fused_attention(False)  # explicit q k^T and attn v matmuls, counted by the FLOP counter
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(torch.zeros(1, 3, 64, 48))
    spec = VIT_ARCHITECTURES["vit_tiny"]
    two_blocks = type(spec)(spec.embed_dim, 2, spec.num_heads)
    assert vit_forward_flops(two_blocks, 64, 48, 8) == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_plan_costs_every_compute_job_of_the_paper_dag_from_its_resolved_config():
    config, _ = load_workflow_config(PAPER)
    rates = load_rates()
    jobs = {(j.model, j.stage): j for j in plan(config, rates, "nvidia-h200")}
    # 98 Snakemake jobs = 72 compute jobs + 13 attention maps + 9 sweep selections + 4 result rules
    assert len(jobs) == 72
    # extra_stages: the 11 evaluations with an official recipe but no paper number, ~49 GPU-hours
    extra = {(j.model, j.stage): j for j in plan({**config, "extra_stages": True}, rates, "nvidia-h200")}
    added = set(extra) - set(jobs)
    assert set(jobs) < set(extra) and len(added) == 11 and ("vit_large", "seg_upernet") in added
    assert {m for m, _ in added} == {"vit_small", "vit_base", "vit_large"}
    assert 40 < sum(extra[key].device_hours for key in added) < 60
    pretrain = jobs["vit_small", "pretrain"]
    measured = rates["devices"]["nvidia-h200"]["pretrain"]["images_per_s"]
    assert pretrain.device_hours == pytest.approx(800 * 1_281_167 / measured / 3600, rel=1e-6)  # the calibration
    assert pretrain.gpus == 16 and pretrain.wall_hours == pytest.approx(pretrain.device_hours / 16)
    assert jobs["vit_large", "pretrain"].gpus == 64
    assert ("vit_small", "finetune[lr=0.004]") in jobs  # swept stages: one job per value, as the DAG runs them
    # a value of the resolved config changes the estimate: half the fine-tuning epochs, ~half the cost
    config["models"]["vit_small"].setdefault("overrides", {})["finetune"] = {"epochs": 100}
    halved = {(j.model, j.stage): j for j in plan(config, rates, "nvidia-h200")}["vit_small", "finetune[lr=0.004]"]
    assert halved.device_hours == pytest.approx(jobs["vit_small", "finetune[lr=0.004]"].device_hours / 2, rel=1e-6)


def test_unknown_device_kind_names_the_measured_ones():
    with pytest.raises(KeyError, match="no device 'tpu-v9'.*nvidia-h200"):
        effective_flops_per_s(load_rates(), "tpu-v9")


def test_swin_flops_scale_with_pixels():
    assert backbone_forward_flops("swin_tiny", 448, 448, 4) == pytest.approx(4 * backbone_forward_flops(
        "swin_tiny", 224, 224, 4))


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "ibot.results", "plan", "--configfile", *PAPER, "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    assert "vit_small" in result.stdout and "GPU-hours" in result.stdout
    assert len(json.loads(out.read_text())["jobs"]) == 72
    extra = subprocess.run([sys.executable, "-m", "ibot.results", "plan", "--configfile", *PAPER, "--config",
                            "extra_stages=true"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "total: 83 compute jobs" in extra.stdout and "vit_large                seg_upernet" in extra.stdout


def _tab19_paper_memory() -> dict[str, float]:
    """Tab.19's peak GB per GPU from the reference CSV, keyed like TAB19_SETTINGS."""
    import csv

    rows = [r for r in csv.DictReader((ROOT / "results" / "reference" / "ibot_paper_ablations.csv").open())
            if r["table"] == "Tab.19 time/memory" and r["metric"] == "gpu_mem"]
    found = {}
    for row in rows:
        method = "BEiT" if row["model"].startswith("BEiT") else "DINO" if row["model"].startswith("DINO") else "iBOT"
        crops = row["protocol"].split("crops ")[1].replace("^2", "")
        found[f"{method} {crops}"] = float(row["value"])
    return found


def test_memory_model_predicts_the_tab19_rows_it_was_not_calibrated_on():
    """One factor, calibrated on Tab.19's iBOT 2x224^2 row (13.1 GB), predicts the other four rows within 15 %
    (DINO 2 crops 9.3, DINO multi-crop 15.4, iBOT multi-crop 19.5, BEiT 5.6) with the official code's layout;
    this repository's layout (heads on masked tokens only) needs less, never more, in the same settings."""
    paper = _tab19_paper_memory()
    assert set(paper) == set(TAB19_SETTINGS)
    official, ours = tab19_memory("official"), tab19_memory("ours")
    assert official["iBOT 2x224"] == pytest.approx(paper["iBOT 2x224"])  # the calibration point
    assert 1.0 < activation_factor() < 2.5  # the count explains most of the measured bytes
    for name, value in paper.items():
        assert official[name] == pytest.approx(value, rel=0.15), name
        assert ours[name] <= official[name] + 1e-9, name
    # MIM adds memory, multi-crop more: the table's order
    assert official["DINO 2x224"] < official["iBOT 2x224"] < official["DINO 2x224+10x96"] < official[
        "iBOT 2x224+10x96"]
    assert ours["iBOT 2x224"] < official["iBOT 2x224"] and ours["DINO 2x224"] == official["DINO 2x224"]


def test_plan_predicts_pretraining_time_marks_and_memory():
    """T100/T300/T800 proportional to epochs where the run reaches them; a positive memory figure for the
    paper's and the embedded config; the table shows them and the device kind."""
    config, _ = load_workflow_config(PAPER)
    rates = load_rates()
    jobs = plan(config, rates, "nvidia-h200")
    small = next(j for j in jobs if (j.model, j.stage) == ("vit_small", "pretrain"))  # 800 epochs
    assert small.epoch_hours == pytest.approx({100: small.wall_hours / 8, 300: small.wall_hours * 3 / 8,
                                               800: small.wall_hours})
    assert 2 < small.peak_memory_gb < 40
    base = next(j for j in jobs if (j.model, j.stage) == ("vit_base", "pretrain"))  # 400 epochs
    assert set(base.epoch_hours) == {100, 300} and base.peak_memory_gb > small.peak_memory_gb
    assert all(j.peak_memory_gb is None and not j.epoch_hours for j in jobs if j.stage != "pretrain")
    text = format_plan(jobs, "nvidia-h200", rates["devices"]["nvidia-h200"])
    assert "pretraining on nvidia-h200" in text and "T800 h" in text and "peak GiB" in text
    embedded, _ = load_workflow_config([str(ROOT / "config" / "config.yaml")])
    tiny = [j for j in plan(embedded, rates, "cpu-2core-avx2") if j.stage == "pretrain"]
    assert tiny and all(j.peak_memory_gb > 0 for j in tiny)
