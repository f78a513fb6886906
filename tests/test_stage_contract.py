"""The stage contract: adding a stage is one registry entry, one ``run(ctx)`` function and its schema section.

A toy stage (the mean norm of frozen [CLS] features of the val images) is added that way to a scratch
copy of the project, then planned by Snakemake (its rule generated from the entry) and run by the one
command line (``python -m downstream toy``, through the launcher's local submitit job).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ibot.metrics import read_metrics
from test_knn import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TOY_ENTRY = '    Stage("toy", "downstream.toy:run", "toy", ("imagenet",), "toy: mean norm of frozen [CLS] features"),\n'
TOY_SCHEMA = """type: object
additionalProperties: false
properties:
  crop: {type: integer, minimum: 16, default: 32, description: "centre crop of the val images (px)"}
"""
TOY_RUN = '''"""A toy stage: the mean norm of the frozen [CLS] features of the val images."""
from downstream.engine.data import eval_transform, image_folder, make_loader
from downstream.engine.features import cls_features, extract_features
from downstream.engine.setup import build_eval_backbone, pick_device


def run(ctx):
    device, crop = pick_device(), int(ctx.config["crop"])
    backbone = build_eval_backbone(ctx.model, ctx.checkpoint, crop).to(device)
    val = image_folder(ctx.data_root, "val", eval_transform(crop, crop))
    feats, _ = extract_features(lambda x: cls_features(backbone, x), make_loader(val, 8, shuffle=False), len(val),
                                device=device)
    metrics = {"cls_norm": float(feats.norm(dim=1).mean())}
    ctx.write_metrics(task="toy", dataset=ctx.data_root.name, protocol=f"cls-norm,{crop}px", metrics=metrics)
    return metrics
'''


def _project_copy(dest: Path) -> Path:
    """The files of this working tree git knows (tracked or not ignored), without results."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in listed:
        source = ROOT / name
        if source.is_file() and not name.startswith("results/embedded"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(source.read_bytes())
    return dest


def test_a_toy_stage_is_one_entry_one_function_one_schema(tmp_path: Path) -> None:
    project = _project_copy(tmp_path / "project")
    registry = project / "ibot" / "stages.py"
    text = registry.read_text()
    anchor = "\n)\n\n#: Every stage by name"
    registry.write_text(text.replace(anchor, "\n" + TOY_ENTRY.rstrip("\n") + anchor, 1))
    (project / "downstream" / "toy.py").write_text(TOY_RUN)
    (project / "workflow" / "schemas" / "toy.schema.yaml").write_text(TOY_SCHEMA)
    added = sum(len(part.strip().splitlines()) for part in (TOY_ENTRY, TOY_RUN, TOY_SCHEMA))
    assert added <= 40, added

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(run="toy", stages=["toy"],
                  models={"tiny": {"arch": "vit_tiny", "patch_size": 8, "depth": 2, "weights": "random"}})
    config["data"] = {"embedded": {**config["data"]["embedded"], "generate": False},
                      "imagenet": str(make_image_folder(tmp_path / "imagenet", train=2, val=3))}
    (project / "config" / "toy.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(project)}
    snakemake = [sys.executable, "-m", "snakemake", "--configfile", "config/toy.yaml", "--cores", "1"]

    plan = subprocess.run([*snakemake, "-n", "-p"], cwd=project, env=env, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    assert "rule toy:" in plan.stdout and "-m downstream toy --data imagenet=" in plan.stdout
    listed = subprocess.run([sys.executable, "-m", "downstream", "--list"], cwd=project, env=env, capture_output=True,
                            text=True)
    assert "toy: mean norm of frozen [CLS] features" in listed.stdout

    target = "results/toy/tiny/toy/metrics.json"
    done = subprocess.run([*snakemake, target], cwd=project, env=env, capture_output=True, text=True)
    log = project / "results" / "toy" / "logs" / "tiny" / "toy.log"
    assert done.returncode == 0, done.stderr[-3000:] + (log.read_text()[-3000:] if log.is_file() else "")
    record = read_metrics(project / target)
    assert (record["stage"], record["model"], record["protocol"]) == ("toy", "tiny", "cls-norm,32px")
    assert record["metrics"]["cls_norm"] > 0 and record["config"] == {"crop": 32}
    assert "submitted toy-tiny as local job" in log.read_text()  # the one launcher, a real local job
    assert not (project / "results" / "toy" / "tiny" / "toy" / "work").exists()  # not resumable: no work dir
