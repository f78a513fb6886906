"""The Snakemake results rules (the real workflow/rules/common.smk and results.smk, stub stage rules):
summary, tables, plots and figures are built, rebuilt when a stage's metrics change, and the HTML report
builds."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers import BIN, FIXTURES, REPO, planned, sh


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

def pretrain(weights, backbone, heads, curves, metrics, log, run, model):
    from ibot.metrics import write_metrics
    shutil.copy(weights, backbone)  # an exported vit_tiny (depth 1) made by the test
    Path(heads).write_bytes(b"heads")
    shutil.copy(log, curves)
    write_metrics(metrics, run=run, model=model, stage="pretrain", task="pretrain", dataset="embedded",
                  protocol="stub", metrics={"loss": 1.0}, config={}, wall_time_s=0.0)

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
        heads=f"{RESULTS}/{RUN}/{{model}}/pretrain/heads.pth",
        curves=f"{RESULTS}/{RUN}/{{model}}/pretrain/train_log.csv",
        metrics=f"{RESULTS}/{RUN}/{{model}}/pretrain/metrics.json",
    shell: "{PYTHON:q} stub.py pretrain weights.pth {output.backbone:q} {output.heads:q} {output.curves:q} "
           "{output.metrics:q} {FIXTURES}/seed0/vit_small/pretrain/train_log.csv {RUN} {wildcards.model}"


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
    configfile = ["--configfile", "config.yaml"]
    smk = [str(BIN / "snakemake"), *configfile]
    sh(smk + ["-c2", "-q"], tmp_path)
    run = tmp_path / "results" / "embedded"
    for rel in ("summary.csv", "metrics_flat.json", "dvc.yaml", "tables/classification.md", "tables/robustness.tex",
                "plots/ours_vs_paper.png", "curves/loss/pretrain_vit_small.csv", "figures/attention_vit_small.png",
                "figures/attention_vit_tiny.png"):
        assert (run / rel).is_file(), rel
    summary = pd.read_csv(run / "summary.csv")
    # 15 paper values of the ViT-S fixtures less occlusion S.5/NS.5: our occlusion is not the paper protocol
    assert set(summary["run"]) == {"embedded"} and summary["paper_value"].notna().sum() == 13
    assert "| 74.8 " in (run / "tables" / "classification.md").read_text()
    assert planned(tmp_path, *configfile) == set()

    sh(smk + ["--report", "report.html"], tmp_path)
    html = (tmp_path / "report.html").read_text()
    for text in ("ours_vs_paper.png", "attention_vit_small.png", "classification.html", "Robustness of the linear head",
                 "iBOT reproduction"):
        assert text in html, text

    metrics = run / "vit_small" / "knn" / "metrics.json"  # a stage result changes: the results rebuild
    record = json.loads(metrics.read_text())
    record["metrics"]["top1_k20"] = 76.5
    metrics.write_text(json.dumps(record))
    assert planned(tmp_path, *configfile) == {"summary", "tables", "plots", "all"}
