"""The paper's evaluations from the released checkpoints: config/released.yaml.

It must name every checkpoint of the official README's model tables (file names as released, teacher or
student as the table marks it), plan evaluations only, cost them (``ibot plan``) and reproduce every paper
number whose model was released (``ibot coverage``). Stand-in checkpoints in the released key layouts
(``{'state_dict': ...}`` teachers, the official Swin layout, a full ``checkpoint.pth``) take the place of
the downloads; the large ViT-B/L files are empty stand-ins, enough for the DAG (Snakemake reads no weights).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_swin import _official_swin_tiny, official  # noqa: F401  (the official Swin fixture)

from ibot.checkpoint import BackboneCheckpoint
from ibot.cli import main as ibot_main
from ibot.config import load_workflow_config, model_spec, planned_stages
from ibot.models.pretrained import build_pretrained_backbone
from ibot.models.vision_transformer import build_backbone

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/bytedance+ibot/repo")
RELEASED = ROOT / "config" / "released.yaml"
PLACEHOLDER = "/weights/"


def _official_table() -> dict[str, str]:
    """``<folder>/<file>`` -> 't'/'s' for every backbone link of the official README's model tables."""
    try:
        readme = subprocess.run(["git", "-C", str(MIRROR), "show", "HEAD:README.md"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"official iBOT mirror not available at {MIRROR}: {error}")
    links = re.findall(r'archive/2022/ibot/([\w]+/checkpoint_\w+\.pth)">backbone \(([ts])\)', readme)
    assert len(links) == 9, links  # 7 IN-1K rows (README.md:123-206) + 2 IN-22K rows (README.md:226-253)
    return dict(links)


def test_released_config_names_every_checkpoint_of_the_official_table():
    config, _ = load_workflow_config([RELEASED])
    table = _official_table()
    named = {m: e["checkpoint"].split(PLACEHOLDER, 1)[1].split("/", 1)[1] for m, e in config["models"].items()}
    assert set(table) <= set(named.values()), set(table) - set(named.values())
    for model, path in named.items():
        entry = config["models"][model]
        assert entry["weights"] == "checkpoint" and entry.get("paper_model") and planned_stages(config, model)
        if path in table:  # teacher or student, as the table marks the backbone
            assert path.endswith({"t": "checkpoint_teacher.pth", "s": "checkpoint_student.pth"}[table[path]])
    in22k = {m for m, e in config["models"].items() if e["pretrain_data"] == "IN-22K"}
    assert {config["models"][m].get("paper_variant") for m in in22k} == {None, "FT 384", "FT 512"}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, official) -> Path:  # noqa: F811
    """config/released.yaml with its paths under a temp folder holding stand-ins in the released layouts."""
    root = tmp_path_factory.mktemp("released")
    text = RELEASED.read_text().replace(PLACEHOLDER, f"{root}/weights/")
    configfile = root / "released.yaml"
    configfile.write_text(text)
    torch.manual_seed(0)
    vits = build_backbone("vit_small", patch_size=16, masked_im_modeling=False).state_dict()
    swin14 = _official_swin_tiny(official, 14, masked=False).state_dict()
    for path in sorted(set(re.findall(rf"{root}/weights/[^\s,}}]+", text))):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.name == "vits_16" and path.name == "checkpoint_teacher.pth":
            torch.save({"state_dict": vits}, path)  # extract_backbone_weights.py's layout
        elif path.parent.name == "vits_16_out_dim_1000":  # full ckpt: main_ibot.py:348-350 keys
            torch.save({"teacher": {f"backbone.{k}": v for k, v in vits.items()}, "student": {}, "epoch": 800}, path)
        elif path.parent.name == "swint_14":
            torch.save({"state_dict": swin14}, path)  # the official Swin key layout
        else:
            torch.save({"state_dict": {}}, path)  # planning only
    return configfile


def test_stand_ins_load_as_their_models(stand_ins):
    config, _ = load_workflow_config([stand_ins])
    for model in ("vit_small", "vit_small_out1000", "swin_tiny_14"):
        entry = config["models"][model]
        checkpoint = BackboneCheckpoint(Path(entry["checkpoint"]), entry.get("checkpoint_key"))
        backbone = build_pretrained_backbone(model_spec(config, model), checkpoint)
        assert backbone.embed_dim in (384, 768) and len(checkpoint.sha256) == 64


def test_snakemake_plans_evaluations_only(stand_ins, tmp_path):
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "-s", str(ROOT / "Snakefile"),
                             "--configfile", str(stand_ins), "--directory", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.M))
    assert "pretrain" not in counts and "embedded_data" not in counts
    config, _ = load_workflow_config([stand_ins])
    expected = sum(len(planned_stages(config, m)) for m in config["models"])
    stage_jobs = sum(int(n) for rule, n in counts.items()
                     if rule not in {"total", "all", "summary", "tables", "plots", "attention_maps", "dvc_yaml",
                                     "finetune_run"})
    assert stage_jobs == expected


def test_plan_costs_evaluations_only(stand_ins, tmp_path, capsys):
    assert ibot_main(["plan", "--configfile", str(stand_ins), "--json", str(tmp_path / "plan.json")]) == 0
    assert "(0 pretraining," in capsys.readouterr().out
    jobs = json.loads((tmp_path / "plan.json").read_text())["jobs"]
    assert jobs and not any(job["stage"] == "pretrain" for job in jobs)


def test_coverage_reproduces_every_released_models_numbers(stand_ins, capsys):
    ibot_main(["coverage", "--configfile", str(stand_ins)])
    headline = capsys.readouterr().out
    produced, total = map(int, re.search(r"\*\*(\d+) of (\d+) iBOT numbers", headline).groups())
    reasons = re.findall(r"^\| (no model with [^|]+) \| \d+ \|$", headline, flags=re.M)
    assert produced > 0 and (produced == total or reasons), headline
    # what is left is exactly what was never released: the no-multi-crop models and ViT-S/16 on IN-22K
    assert all("'no multi-crop'" in r or ("'ViT-S/16'" in r and "IN-22K" in r) for r in reasons), reasons
    assert yaml.safe_load(RELEASED.read_text())["run"] == "released"
