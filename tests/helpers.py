"""Helpers the tests share (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

DEBUG = json.dumps({"cluster": "debug"})
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts: snakemake, dvc, moto_server
FIXTURES = REPO / "tests" / "fixtures" / "metrics"  # stage metrics.json records of two seeds (and side files)


def run_stage(stage: str, argv: Sequence[str], *, cluster: str = "debug") -> Any:
    """``python -m downstream <stage> ARGV`` in this process (``--resources`` added unless given)."""
    from ibot.run.cli import main

    argv = list(argv)
    if "--resources" not in argv:
        argv += ["--resources", json.dumps({"cluster": cluster})]
    return main([stage, *argv])


def run_pretrain(images: str | Path, out_dir: str | Path, config: Mapping[str, Any], spec: Mapping[str, Any],
                 *, cluster: str = "debug") -> Any:
    """The pretraining stage on an ImageFolder of training ``images`` into ``out_dir``; returns its summary."""
    from ibot.models.specs import ModelSpec

    return run_stage("pretrain", ["--data", f"imagenet={images}", "--out", str(Path(out_dir) / "metrics.json"),
                                  "--config", json.dumps(dict(config)), "--run", "t", "--model", "m",
                                  *ModelSpec.of(spec).cli_args()], cluster=cluster)


def sh(cmd: Sequence[Any], cwd: str | Path, stdout_only: bool = False, **kwargs: Any) -> str:
    """Run ``cmd`` in ``cwd`` (git identity set, DVC analytics off, this checkout importable); it must
    succeed. Returns its stdout, and stderr after it unless ``stdout_only``."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True, capture_output=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def planned_rules(output: str) -> set[str]:
    """The rules of the jobs that ``snakemake -n --quiet rules`` printed in ``output``."""
    return set(re.findall(r"^(\w+)\s+\d+$", output, flags=re.M)) - {"total", "job"}


def planned(cwd: str | Path, *snakemake_args: str) -> set[str]:
    """The rules ``snakemake *snakemake_args`` would run in ``cwd`` (a dry run)."""
    return planned_rules(sh([BIN / "snakemake", *snakemake_args, "-n", "--quiet", "rules"], cwd))


_TINY_PRETRAIN_SNAKEFILE = '''
rule all:
    input: "results/embedded/vit_tiny/knn/metrics.json"

rule embedded_data:
    output: "results/data/embedded/imagenet.complete"
    shell: "echo data > {output}"

rule pretrain:
    input: "results/data/embedded/imagenet.complete"
    output:
        backbone="results/embedded/vit_tiny/pretrain/teacher_backbone.pth",
        heads="results/embedded/vit_tiny/pretrain/heads.pth",
        curves="results/embedded/vit_tiny/pretrain/train_log.csv",
        metrics="results/embedded/vit_tiny/pretrain/metrics.json",
    shell: "head -c BACKBONE_BYTES /dev/urandom > {output.backbone}; head -c 20000 /dev/urandom > {output.heads}; "
           "printf 'iteration,loss\\\\n0,1\\\\n' > {output.curves}; echo '{{\\"epochs\\": 1}}' > {output.metrics}"

rule knn:
    input: "results/embedded/vit_tiny/pretrain/teacher_backbone.pth", "results/data/embedded/imagenet.complete"
    output: "results/embedded/vit_tiny/knn/metrics.json"
    shell: "echo '{{}}' > {output}"
'''


def tiny_pretrain_snakefile(backbone_bytes: int) -> str:
    """A Snakefile of a tiny workflow, embedded_data -> pretrain -> knn, whose pretrain rule writes the
    pretraining stage's outputs (teacher_backbone.pth of ``backbone_bytes`` random bytes, heads.pth,
    train_log.csv, metrics.json) in seconds: what the DVC tests track, push and pull."""
    return _TINY_PRETRAIN_SNAKEFILE.replace("BACKBONE_BYTES", str(int(backbone_bytes)))


def kill_at_second_evaluation(monkeypatch: Any) -> None:
    """Make the fine-tuning loop's second evaluation raise KeyboardInterrupt (a kill after epoch 1's
    checkpoint); ``monkeypatch.undo()`` or a new setattr restores it."""
    from downstream.engine import finetune

    real_evaluate, calls = finetune.evaluate, []

    def dying_evaluate(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(finetune, "evaluate", dying_evaluate)
