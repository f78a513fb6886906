"""Reruns never reuse stale work: the resume rule (ibot.workdir) in each of the five resumable stages.

For pretraining, linear probing, fine-tuning, detection and segmentation, after a completed run:
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

from ibot.config import deep_merge
from ibot.metrics import read_metrics
from ibot.workdir import FINGERPRINT_FILE

pytestmark = pytest.mark.slow

TINY_VIT = {"arch": "vit_tiny", "patch_size": 8, "depth": 2}
TINY_ARGS = ["--arch", "vit_tiny", "--depth", "2", "--patch-size", "8"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors_digest(state: dict[str, Any]) -> str:
    """Digest of a state dict's tensors (checkpoint files also hold timestamps and paths)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# -- the five stages, each: run(config, out_dir) -> (result digest, metrics record or summary) -----------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, Path]:
    from ibot.data.embedded import EmbeddedSizes, generate

    sizes = EmbeddedSizes(classes=3, train_per_class=8, val_per_class=2, c_per_class=2, a_classes=2, image_size=32, coco_train=8, coco_val=4,
                          coco_size=64, ade_train=8, ade_val=4, ade_size=64)
    return generate(tmp_path_factory.mktemp("rerun_data"), seed=0, sets=["imagenet", "coco", "ade20k"], sizes=sizes)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from ibot.checkpoint import export_backbone
    from ibot.models.vision_transformer import build_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "teacher_backbone.pth"
    export_backbone(build_backbone("vit_tiny", patch_size=8, depth=2, masked_im_modeling=False), path, meta={})
    return path


def _pretrain(embedded, weights, config, out: Path):
    from ibot.train.pretrain import DEFAULTS, run

    tiny = {"epochs": 2, "batch_size_per_gpu": 8, "global_crops_size": 32, "local_crops_size": 16,
            "local_crops_number": 2, "num_workers": 0, "out_dim": 64, "patch_out_dim": 64, "warmup_epochs": 1,
            "warmup_teacher_temp_epochs": 1, "saveckp_freq": 0, "log_every": 100, "precision": "fp32"}
    summary = run(deep_merge(DEFAULTS, {**tiny, **config}), TINY_VIT, str(embedded["imagenet"] / "train"), str(out),
                  "t", "m", 0)
    return _sha256(out / "teacher_backbone.pth"), summary


def _linear(embedded, weights, config, out: Path):
    from downstream import linear

    tiny = {"resize": 36, "crop": 32, "batch_size": 8, "num_workers": 0, "epochs": 2, "lrs": [0.01, 0.3],
            "n_last_blocks": 1}
    metrics = out / "metrics.json"
    linear.main(["--data", str(embedded["imagenet"]), "--out", str(metrics), "--config", json.dumps({**tiny, **config}),
                 "--checkpoint", str(weights), "--resources", '{"cluster": "debug"}', *TINY_ARGS])
    head = torch.load(out / "head.pth", weights_only=True)
    return _tensors_digest(head["state_dict"]), read_metrics(metrics)


def _finetune(embedded, weights, config, out: Path):
    from downstream import finetune

    tiny = {"resize": 36, "crop": 32, "batch_size": 8, "num_workers": 0, "epochs": 2, "warmup_epochs": 1,
            "precision": "fp32"}
    metrics = out / "metrics.json"
    finetune.main(["--data", str(embedded["imagenet"]), "--out", str(metrics), "--config",
                   json.dumps({**tiny, **config}), "--checkpoint", str(weights), "--resources",
                   '{"cluster": "debug"}', *TINY_ARGS])
    state = torch.load(out / "work" / "checkpoint.pth", weights_only=True)
    return _tensors_digest(state["model"]), read_metrics(metrics)


def _mmengine_weights(work: Path) -> str:
    last = Path((work / "last_checkpoint").read_text().strip())
    return _tensors_digest(torch.load(last, map_location="cpu", weights_only=False)["state_dict"])


def _detection(embedded, weights, config, out: Path):
    from downstream.dense import detection

    tiny = {"epochs": 1, "lr_steps": [1], "warmup_iters": 2, "batch_size": 2, "train_scales": [64], "max_size": 107,
            "crop_aug": False, "test_scale": 64, "rpn_train_proposals": 50, "rpn_test_proposals": 20,
            "rcnn_sampler_num": 16, "score_thr": 0.0, "neck_channels": 16, "head_conv_channels": 16,
            "head_fc_channels": 32, "num_workers": 0, "log_interval": 4}
    metrics = out / "metrics.json"
    detection.run(deep_merge(detection.DEFAULTS, {**tiny, **config}), TINY_VIT, str(weights), None,
                  str(embedded["coco"]), str(metrics), "t", "m", 0)
    return _mmengine_weights(out / "work"), read_metrics(metrics)


def _segmentation(embedded, weights, config, out: Path):
    from downstream.dense import segmentation

    tiny = {"head": "upernet", "iters": 6, "warmup_iters": 2, "batch_size": 2, "crop_size": 64, "slide_stride": 43,
            "scale": [256, 64], "num_workers": 0, "log_interval": 3, "checkpoint_interval": 6,
            "upernet": {"channels": 16}}
    metrics = out / "metrics.json"
    segmentation.run(deep_merge(segmentation.DEFAULTS, deep_merge({**tiny}, config, allow_new=True)), TINY_VIT,
                     str(weights), None, str(embedded["ade20k"]), str(metrics), "t", "m", 0)
    return _mmengine_weights(out / "work"), read_metrics(metrics)


STAGES: dict[str, tuple[Callable, dict[str, Any]]] = {
    "pretrain": (_pretrain, {"lr": 0.004}),
    "linear": (_linear, {"lrs": [0.02, 0.5]}),
    "finetune": (_finetune, {"lr": 2e-3}),
    "detection": (_detection, {"lr": 3e-4}),
    "seg_upernet": (_segmentation, {"upernet": {"lr": 3e-4}}),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", list(STAGES))
def test_rerun_resumes_same_setup_and_starts_fresh_after_a_config_change(stage: str, embedded, weights,
                                                                          tmp_path: Path, capfd) -> None:
    run_stage, change = STAGES[stage]
    out = tmp_path / "results" / "t" / "m" / stage
    work = out / "work"

    first, record = run_stage(embedded, weights, {}, out)
    digest = json.loads((work / FINGERPRINT_FILE).read_text())["digest"]
    record_fingerprint = record["fingerprint"] if stage == "pretrain" else record["extra"]["fingerprint"]
    assert record_fingerprint == digest  # the result names the work it came from
    capfd.readouterr()

    # identical rerun: resumes, trains nothing new (no checkpoint rewritten), same result
    checkpoints = {p: p.stat().st_mtime_ns for p in work.rglob("*.pth")}
    again, record_again = run_stage(embedded, weights, {}, out)
    assert "matches this run" in capfd.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.pth")} == checkpoints
    assert again == first
    assert not list(out.glob("work.stale-*"))
    if stage == "pretrain":
        assert record_again["resumed_from_epoch"] == record_again["epochs"]
    else:
        assert record_again["metrics"] == record["metrics"]

    # changed config: the old work is moved aside (kept), a fresh run gives another result
    changed, record_changed = run_stage(embedded, weights, change, out)
    log = capfd.readouterr().out
    stale = list(out.glob("work.stale-*"))
    assert len(stale) == 1 and "moved aside" in log and "starting fresh" in log
    assert json.loads((stale[0] / FINGERPRINT_FILE).read_text())["digest"] == digest
    assert any(stale[0].glob("*.pth")) or (stale[0] / "last_checkpoint").is_file()  # the old checkpoints are kept
    assert changed != first
    new_digest = json.loads((work / FINGERPRINT_FILE).read_text())["digest"]
    assert new_digest != digest
    if stage == "pretrain":
        assert record_changed["resumed_from_epoch"] == 0 and record_changed["fingerprint"] == new_digest
    else:
        assert record_changed["extra"]["fingerprint"] == new_digest
