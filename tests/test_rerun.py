"""Reruns never reuse stale work: the resume rule (ibot.workdir) in every resumable stage of the registry.

For each run function of a ``resumable`` registry entry (pretraining, linear and part-wise probing, fine-tuning,
semi-supervised, transfer, detection, segmentation; entries sharing a function share its resume code,
so one of them runs), after a completed run:
- an identical rerun resumes (trains nothing) and gives the identical result;
- a rerun with a changed config moves the old work directory aside (kept, with its checkpoints),
  starts fresh, and gives a different result, recorded with the new fingerprint.
The "result" compared is what the stage trained (weights), not only its rounded metrics.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from helpers import run_stage
from ibot.metrics import read_metrics
from ibot.stages import STAGES
from ibot.workdir import FINGERPRINT_FILE

pytestmark = pytest.mark.slow

TINY_ARGS = ["--arch", "vit_tiny", "--depth", "2", "--patch-size", "8"]


def _tensors_digest(state: dict[str, Any]) -> str:
    """Digest of a state dict's tensors (checkpoint files also hold timestamps and paths)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, Path]:
    from ibot.data.embedded import EmbeddedSizes, generate

    sizes = EmbeddedSizes(classes=3, train_per_class=8, val_per_class=2, c_per_class=2, a_classes=2, image_size=32,
                          coco_train=8, coco_val=4, coco_size=64, ade_train=8, ade_val=4, ade_size=64,
                          transfer_train_per_class=4, transfer_val_per_class=2)
    return generate(tmp_path_factory.mktemp("rerun_data"), seed=0,
                    sets=["imagenet", "coco", "ade20k", "cifar10"], sizes=sizes)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from ibot.checkpoint import export_backbone
    from ibot.models.vision_transformer import build_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "teacher_backbone.pth"
    export_backbone(build_backbone("vit_tiny", patch_size=8, depth=2, masked_im_modeling=False), path, meta={})
    return path


def _mmengine_weights(work: Path) -> str:
    last = Path((work / "last_checkpoint").read_text().strip())
    return _tensors_digest(torch.load(last, map_location="cpu", weights_only=False)["state_dict"])


def _trained(path: str, key: str | None = None) -> Callable[[Path], str]:
    """What a stage trained, from its folder: the tensors of ``path`` (under ``key``)."""
    def digest(out: Path) -> str:
        state = torch.load(out / path, weights_only=True)
        return _tensors_digest(state[key] if key else state)
    return digest


#: Per run function: (the stage run, its tiny config, the config change, what it trained, dataset kind).
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], Callable[[Path], str], str]] = {
    "ibot.train.pretrain:run": (
        "pretrain", {"epochs": 2, "batch_size_per_gpu": 8, "global_crops_size": 32, "local_crops_size": 16,
                     "local_crops_number": 2, "num_workers": 0, "out_dim": 64, "patch_out_dim": 64, "warmup_epochs": 1,
                     "warmup_teacher_temp_epochs": 1, "saveckp_freq": 0, "log_every": 100, "precision": "fp32"},
        {"lr": 0.004}, _trained("teacher_backbone.pth", "state_dict"), "imagenet"),
    "downstream.linear:run": (
        "linear", {"resize": 36, "crop": 32, "batch_size": 8, "num_workers": 0, "epochs": 2, "lrs": [0.01, 0.3],
                   "n_last_blocks": 1}, {"lrs": [0.02, 0.5]}, _trained("head.pth", "state_dict"), "imagenet"),
    "downstream.linear_part:run": (
        "linear_part", {"resize": 36, "crop": 32, "batch_size": 8, "num_workers": 0, "epochs": 2, "lrs": [0.01, 0.3],
                        "topk": [1, 4]}, {"lrs": [0.02, 0.5]},
        lambda out: _tensors_digest(torch.load(out / "work" / "linear_part_state.pth", weights_only=True)["sweep"]["heads"]),
        "imagenet"),
    "downstream.finetune:run": (
        "finetune", {"resize": 36, "crop": 32, "batch_size": 8, "num_workers": 0, "epochs": 2, "warmup_epochs": 1,
                     "precision": "fp32"}, {"lr": 2e-3}, _trained("work/checkpoint.pth", "model"), "imagenet"),
    "downstream.semi_supervised:run": (
        "semi_supervised", {"protocols": ["finetune"], "subsets": {"1": "SUBSET", "10": "SUBSET"},
                            "finetune": {"resize": 36, "crop": 32, "epochs": 2, "warmup_epochs": 0, "batch_size": 4,
                                         "num_workers": 0, "precision": "fp32"}},
        {"finetune": {"lr": 1e-4}}, _trained("work/finetune_1pct/checkpoint.pth", "model"), "imagenet"),
    "downstream.transfer:run": (
        "transfer_cifar10", {"crop": 32, "epochs": 2, "warmup_epochs": 0, "batch_size": 6, "num_workers": 0,
                             "lr": 5e-3, "precision": "fp32"},
        {"lr": 1e-2}, _trained("work/checkpoint.pth", "model"), "cifar10"),
    "downstream.dense.detection:run": (
        "detection", {"epochs": 1, "lr_steps": [1], "warmup_iters": 2, "batch_size": 2, "train_scales": [64],
                      "max_size": 107, "crop_aug": False, "test_scale": 64, "rpn_train_proposals": 50,
                      "rpn_test_proposals": 20, "rcnn_sampler_num": 16, "score_thr": 0.0, "neck_channels": 16,
                      "head_conv_channels": 16, "head_fc_channels": 32, "num_workers": 0, "log_interval": 4},
        {"lr": 3e-4}, lambda out: _mmengine_weights(out / "work"), "coco"),
    "downstream.dense.segmentation:run": (
        "seg_upernet", {"iters": 6, "warmup_iters": 2, "batch_size": 2, "crop_size": 64, "slide_stride": 43,
                        "scale": [256, 64], "num_workers": 0, "log_interval": 3, "checkpoint_interval": 6,
                        "upernet": {"channels": 16}},
        {"upernet": {"lr": 3e-4}}, lambda out: _mmengine_weights(out / "work"), "ade20k"),
}


def test_every_resumable_entry_has_a_case_and_only_those_keep_work() -> None:
    assert set(CASES) == {stage.entry for stage in STAGES.values() if stage.resumable}
    assert all(STAGES[case[0]].resumable for case in CASES.values())


def _merge(config: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    return {**config, **{k: _merge(config.get(k) or {}, v) if isinstance(v, dict) else v for k, v in change.items()}}


def _run(entry: str, embedded, weights, change, out: Path) -> tuple[str, dict]:
    stage, config, _, trained, kind = CASES[entry]
    config = _merge(config, change)
    if stage == "semi_supervised":  # one label per class: the subsets of the embedded ImageNet
        subset = out.parent / "subset.txt"
        subset.parent.mkdir(parents=True, exist_ok=True)
        subset.write_text("\n".join(sorted(p.name for p in (embedded["imagenet"] / "train").glob("*/*"))[::8]) + "\n")
        config["subsets"] = {label: str(subset) for label in config["subsets"]}
    data = embedded[kind] / "train" if stage == "pretrain" else embedded[kind]
    argv = ["--data", f"{kind}={data}", "--out", str(out / "metrics.json"), "--config", json.dumps(config),
            "--run", "t", "--model", "m", *TINY_ARGS] + ([] if stage == "pretrain" else ["--checkpoint", str(weights)])
    run_stage(stage, argv)
    return trained(out), read_metrics(out / "metrics.json")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("entry", list(CASES))
def test_rerun_resumes_same_setup_and_starts_fresh_after_a_config_change(entry: str, embedded, weights,
                                                                          tmp_path: Path, capfd) -> None:
    stage, _, change, _, _ = CASES[entry]
    out = tmp_path / "results" / "t" / "m" / stage
    work = out / "work"

    first, record = _run(entry, embedded, weights, {}, out)
    digest = json.loads((work / FINGERPRINT_FILE).read_text())["digest"]
    assert record["extra"]["fingerprint"] == digest  # the result names the work it came from
    capfd.readouterr()

    # identical rerun: resumes, trains nothing new (no checkpoint rewritten), same result
    checkpoints = {p: p.stat().st_mtime_ns for p in work.rglob("*.pth")}
    again, record_again = _run(entry, embedded, weights, {}, out)
    assert "matches this run" in capfd.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.pth")} == checkpoints
    assert again == first and record_again["metrics"] == record["metrics"]
    assert not list(out.glob("work.stale-*"))

    # changed config: the old work is moved aside (kept), a fresh run gives another result
    changed, record_changed = _run(entry, embedded, weights, change, out)
    log = capfd.readouterr().out
    stale = list(out.glob("work.stale-*"))
    assert len(stale) == 1 and "moved aside" in log and "starting fresh" in log
    assert json.loads((stale[0] / FINGERPRINT_FILE).read_text())["digest"] == digest
    assert any(stale[0].rglob("*.pth")) or (stale[0] / "last_checkpoint").is_file()  # the old checkpoints are kept
    assert changed != first
    new_digest = json.loads((work / FINGERPRINT_FILE).read_text())["digest"]
    assert new_digest != digest and record_changed["extra"]["fingerprint"] == new_digest


def _snakemake(project: Path, workdir: Path, config: Path, *args: str) -> str:
    """``snakemake`` of a copy of the project (its code on PYTHONPATH: what the jobs import) in ``workdir``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(project)}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(project / "Snakefile"), "--directory",
                             str(workdir), "--configfile", str(config), "-c1", *args],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _linear_config(path: Path, embedded, weights, **linear: Any) -> Path:
    """A workflow config evaluating the tiny weights with the tiny linear probe of CASES (local jobs)."""
    import yaml

    path.write_text(yaml.safe_dump({
        "run": "t", "stages": ["linear"], "data": {"embedded": {"generate": False}, "imagenet": str(embedded["imagenet"])},
        "models": {"m": {"arch": "vit_tiny", "depth": 2, "patch_size": 8, "weights": "checkpoint",
                         "checkpoint": str(weights)}},
        "linear": {**CASES["downstream.linear:run"][1], **linear},
        "resources": {"default": {"cluster": "local", "cpus_per_task": 1, "timeout_min": 10}}}))
    return path


@pytest.mark.timeout(900)
def test_forcerun_after_a_code_change_recomputes_and_the_fresh_switch_forces_it(embedded, weights, tmp_path) -> None:
    """README "Rerun one stage", as a user runs it: ``--forcerun`` resumes unchanged work, recomputes after a
    change to the stage's computing code (not after a comment/log change), and ``--config fresh=[...]``
    recomputes unchanged work; every old work directory is kept."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    project = tmp_path / "project"
    for part in ("ibot", "downstream", "workflow", "config", "profiles"):
        shutil.copytree(root / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "Snakefile", project / "Snakefile")
    trained = CASES["downstream.linear:run"][3]
    config = _linear_config(tmp_path / "config.yaml", embedded, weights)
    workdir = tmp_path / "run"
    target = "results/t/m/linear/metrics.json"
    out = workdir / "results" / "t" / "m" / "linear"
    log = workdir / "results" / "t" / "logs" / "m" / "linear.log"

    _snakemake(project, workdir, config, target)
    first = trained(out)
    _snakemake(project, workdir, config, target, "--forcerun", "linear")
    assert "matches this run" in log.read_text() and not list(out.glob("work.stale-*"))

    engine = project / "downstream" / "engine" / "linear.py"  # comments and log lines: still the same code
    engine.write_text(engine.read_text() + "\n# a comment\nprint('a log line')\n")
    assert "Nothing to be done" in _snakemake(project, workdir, config, target)  # code is no rerun trigger
    _snakemake(project, workdir, config, target, "--forcerun", "linear")
    assert "matches this run" in log.read_text() and not list(out.glob("work.stale-*"))

    code = project / "downstream" / "linear.py"  # what the stage computes: another seed for the heads
    code.write_text(code.read_text().replace("device=device, seed=ctx.seed,", "device=device, seed=ctx.seed + 1,"))
    _snakemake(project, workdir, config, target, "--forcerun", "linear")
    text = log.read_text()
    assert "moved aside" in text and "code.modules.downstream.linear" in text
    assert len(list(out.glob("work.stale-*"))) == 1 and trained(out) != first

    changed = trained(out)
    _snakemake(project, workdir, config, target, "--forcerun", "linear", "--config", "fresh=[linear]")
    assert "fresh recompute was requested" in log.read_text()
    stale = list(out.glob("work.stale-*"))
    assert len(stale) == 2 and all(any(s.rglob("*.pth")) for s in stale)  # kept, never deleted
    assert trained(out) == changed  # recomputed from scratch: same code, same config, same result


@pytest.mark.timeout(900)
def test_snakemake_killed_mid_run_unlock_and_rerun_finishes_the_same_work(embedded, weights, tmp_path) -> None:
    """README "Reliability: after a kill": Snakemake itself is SIGKILLed while a stage runs. The rerun is refused
    on its lock (the message names --unlock); after `snakemake --unlock` the rerun re-attaches to the still
    running job or resumes its work/ (same fingerprint), moves nothing aside and completes the stage."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    config = _linear_config(tmp_path / "config.yaml", embedded, weights, epochs=60)
    workdir = tmp_path / "run"
    target = "results/t/m/linear/metrics.json"
    out = workdir / "results" / "t" / "m" / "linear"
    command = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(config), "-c1", target]
    snakemake = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "work" / "linear_state.pth").is_file():  # the stage has checkpointed an epoch
        assert time.time() < deadline and snakemake.poll() is None, "the stage never checkpointed"
        time.sleep(0.2)
    os.kill(snakemake.pid, signal.SIGKILL)  # Snakemake itself dies; its running job is not told
    snakemake.wait(timeout=30)
    assert not (out / "metrics.json").is_file(), "the stage finished before the kill: raise its epochs"

    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr
    subprocess.run(command + ["--unlock"], check=True, capture_output=True)
    _snakemake(root, workdir, config, target)
    log = (workdir / "results" / "t" / "logs" / "m" / "linear.log").read_text()
    assert "re-attaching to running local job" in log or "matches this run" in log, log[-3000:]
    assert not list(out.glob("work.stale-*"))
    record = read_metrics(out / "metrics.json")
    assert record["extra"]["fingerprint"] == json.loads((out / "work" / FINGERPRINT_FILE).read_text())["digest"]
