"""Linear probing: the one-pass sweep equals separate training, features, CLI, head.pth, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from downstream.engine import linear
from downstream.engine.data import eval_transform, image_folder
from downstream.engine.features import avgpool_mode, feature_dim, linear_features
from downstream.engine.setup import build_eval_backbone
from helpers import run_stage
from ibot.checkpoint import BackboneCheckpoint, CheckpointError
from ibot.stages import stage_defaults
from ibot.metrics import read_metrics
from ibot.models.vision_transformer import build_backbone
from test_knn import TINY, make_image_folder, official_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = stage_defaults("linear")
CONFIG = {"resize": 36, "crop": 32, "batch_size": 8, "num_workers": 0, "epochs": 2, "lrs": [0.01, 0.3, 3.0],
          "n_last_blocks": 2, "avgpool_patchtokens": True}


def _batches(seed: int, steps: int = 4, batch: int = 6, dim: int = 12, classes: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, dim, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(steps)]


def test_sweep_equals_training_each_head_alone() -> None:
    lrs, epochs = [0.001, 0.1, 2.0], 3
    data = [_batches(epoch) for epoch in range(epochs)]
    kwargs = dict(batch_size=512, epochs=epochs, momentum=0.9, weight_decay=0.0, seed=7)
    sweep = linear.LinearSweep(12, 5, lrs, **kwargs)
    alone = [linear.LinearSweep(12, 5, [lr], **kwargs) for lr in lrs]
    for epoch in range(epochs):
        for features, targets in data[epoch]:
            losses = sweep.train_step(features, targets)
            for index, single in enumerate(alone):
                assert torch.allclose(single.train_step(features, targets)[0], losses[index], atol=1e-6)
        sweep.end_epoch()
        for single in alone:
            single.end_epoch()
    for index, single in enumerate(alone):
        for name in ("weight", "bias"):
            assert torch.allclose(sweep.head_state(index)[name], single.head_state(0)[name], atol=1e-6, rtol=0)
    assert sweep.scaled_lrs == [lr * 2 for lr in lrs]  # linear scaling rule: batch / 256
    assert sweep.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # cosine reached 0 after `epochs`


def test_heads_init_and_official_grid() -> None:
    heads = linear.LinearHeads(32, 10, 3, seed=0)
    w = heads.heads[0].weight
    assert torch.equal(w, heads.heads[2].weight) and heads.heads[1].bias.abs().sum() == 0
    assert 0.007 < float(w.detach().std()) < 0.013
    # bytedance/ibot evaluation/eval_linear_multi.py:100, transcribed
    official = [base * n for base in [10 ** k for k in range(-4, 1)] for n in range(1, 10)]
    assert linear.OFFICIAL_LR_GRID == pytest.approx(official, rel=1e-12)
    assert len(linear.OFFICIAL_LR_GRID) == 45 and DEFAULTS["lrs"] is None  # None: this grid


@pytest.mark.parametrize("n_last, avgpool, blocks", [(4, False, 4), (1, True, 2), (2, 2, 3), (1, 1, 1)])
def test_linear_features(n_last: int, avgpool, blocks: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=4, masked_im_modeling=False).eval()
    images = torch.randn(2, 3, 32, 32)
    feats = linear_features(backbone, images, n_last, avgpool)
    assert feats.shape == (2, 192 * blocks) == (2, feature_dim(192, n_last, avgpool))
    with torch.no_grad():
        last = backbone(images)  # final-norm tokens of the last block
    mode = avgpool_mode(avgpool)  # True means the official mode 2 ([CLS] ⊕ patch mean), not 1
    if mode == 1:
        assert torch.allclose(feats, last[:, 1:].mean(1), atol=1e-5)
    else:
        assert torch.allclose(feats[:, 192 * (n_last - 1):192 * n_last], last[:, 0], atol=1e-5)
    if mode == 2:
        assert torch.allclose(feats[:, -192:], last[:, 1:].mean(1), atol=1e-5)


#: bytedance/ibot (commit da316d8) evaluation/eval_linear_multi.py as ``run.sh imagenet_linear ... vit_small
#: teacher 8`` runs it (run.sh:137-149, evaluation/README.md:12), transcribed with the line of each value.
OFFICIAL_EVAL_LINEAR_VIT_S = {
    "n_last_blocks": (4, "run.sh:51-54 LINEAR_N_LAST_BLOCKS=4 for vit_small; eval_linear_multi.py:356"),
    "avgpool_patchtokens": (0, "run.sh:53 LINEAR_AVGPOOL=0 for vit_small; eval_linear_multi.py:358"),
    "epochs": (100, "eval_linear_multi.py:370 --epochs"),
    "batch_size": (128 * 8, "eval_linear_multi.py:375 --batch_size_per_gpu 128 x 8 GPUs (evaluation/README.md:12)"),
    "momentum": (0.9, "eval_linear_multi.py:133 SGD momentum"),
    "weight_decay": (0.0, "eval_linear_multi.py:105 wds=[0] (sweep_lr_only, :387)"),
    "val_freq": (1, "eval_linear_multi.py:383 --val_freq"),
    "resize": (256, "eval_linear_multi.py:56 Resize(256, interpolation=3)"),
    "crop": (224, "eval_linear_multi.py:50 RandomResizedCrop(224), :57 CenterCrop(224)"),
    "train_interpolation": ("bilinear", "eval_linear_multi.py:50 RandomResizedCrop(224): torchvision's default"),
    "num_workers": (10, "eval_linear_multi.py:382 --num_workers"),
    "precision": ("fp32", "eval_linear_multi.py: no autocast anywhere"),
}
#: Ours without an official counterpart: the lr grid (None = eval_linear_multi.py:100, tested above) and
#: caching the deterministic val features.
LINEAR_OWN_SETTINGS = {"lrs", "cache_val_features"}


def test_defaults_equal_the_official_eval_linear_values() -> None:
    assert set(DEFAULTS) == set(OFFICIAL_EVAL_LINEAR_VIT_S) | LINEAR_OWN_SETTINGS
    for key, (official, source) in OFFICIAL_EVAL_LINEAR_VIT_S.items():
        ours = DEFAULTS[key]
        if key == "avgpool_patchtokens":
            ours = avgpool_mode(ours)  # ours accepts booleans for the official 0/2 codes
        assert ours == official, f"linear.{key}: ours {ours!r}, official {official!r} ({source})"


def test_schema_is_closed() -> None:
    import jsonschema
    schema = yaml.safe_load((ROOT / "workflow/schemas/linear.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    jsonschema.validate(DEFAULTS, schema)
    jsonschema.validate({**DEFAULTS, "avgpool_patchtokens": 2, "lrs": [0.1]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**DEFAULTS, "unknown_key": 1}, schema)


def test_cli_end_to_end_head_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imagenet")
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "results" / "linear" / "metrics.json"
    argv = ["--data", str(data), "--out", str(out), "--config", json.dumps(CONFIG), "--checkpoint", str(ckpt),
            "--resources", '{"cluster": "debug"}', *TINY]
    run_stage("linear", argv)
    record = read_metrics(out)
    assert record["stage"] == "linear" and record["task"] == "linear" and set(record["metrics"]) == {"top1"}
    extra = record["extra"]
    assert extra["best_lr"] in CONFIG["lrs"] and 1 <= extra["best_epoch"] <= 2 and len(extra["per_head"]) == 3
    with open(out.parent / "per_head.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2 and max(float(r["top1"]) for r in rows) == record["metrics"]["top1"]

    # head.pth: documented format, loadable, and reproduces the reported accuracy
    head = torch.load(out.parent / "head.pth", weights_only=True)
    meta = head["meta"]
    assert set(head["state_dict"]) == {"weight", "bias"} and head["state_dict"]["weight"].shape == (3, 3 * 192)
    assert meta["classes"] == ["n00000000", "n00000001", "n00000002"] and meta["n_last_blocks"] == 2
    assert (meta["lr"], meta["epoch"], meta["resize"], meta["crop"]) == (extra["best_lr"], extra["best_epoch"], 36, 32)
    spec = {"arch": "vit_tiny", "patch_size": 8, "depth": 2}
    classifier = linear.load_linear_classifier(spec, BackboneCheckpoint(ckpt), out.parent / "head.pth")
    assert not classifier.training
    val = image_folder(data, "val", eval_transform(meta["resize"], meta["crop"]))
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        accuracy = 100.0 * float((classifier(images).argmax(1) == labels).double().mean())
    assert accuracy == pytest.approx(record["metrics"]["top1"])

    # a backbone of another architecture does not fit the head
    with pytest.raises(CheckpointError):
        linear.load_linear_classifier({"arch": "vit_small", "patch_size": 8, "depth": 2}, None, out.parent / "head.pth")

    # rerun after the outputs are removed: resumes from work/ (no training) with the same result
    out.unlink()
    (out.parent / "head.pth").unlink()
    monkeypatch.setattr(linear.LinearSweep, "train_step", lambda *a, **k: pytest.fail("retrained"))
    run_stage("linear", argv)
    assert read_metrics(out)["metrics"] == record["metrics"] and (out.parent / "head.pth").is_file()


def test_random_init_head_reloads(tmp_path: Path) -> None:
    """Random-init baseline: load_linear_classifier(checkpoint=None) rebuilds the same backbone."""
    data = make_image_folder(tmp_path / "imagenet", train=3, val=3)
    out = tmp_path / "results" / "linear" / "metrics.json"
    config = {**CONFIG, "epochs": 1, "lrs": [1.0]}
    torch.manual_seed(123)  # global RNG state must not matter
    run_stage("linear", ["--data", str(data), "--out", str(out), "--config", json.dumps(config), "--seed", "5",
                 "--resources", '{"cluster": "debug"}', *TINY])
    record = read_metrics(out)
    torch.manual_seed(456)
    classifier = linear.load_linear_classifier({"arch": "vit_tiny", "patch_size": 8, "depth": 2}, None,
                                               out.parent / "head.pth")
    val = image_folder(data, "val", eval_transform(36, 32))
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = classifier(images)
    assert 100.0 * float((logits.argmax(1) == labels).double().mean()) == pytest.approx(record["metrics"]["top1"])
    assert torch.load(out.parent / "head.pth", weights_only=True)["meta"]["seed"] == 5
    torch.manual_seed(5)  # what the stage built (seed_everything(seed) right before the backbone)
    reference = build_eval_backbone({"arch": "vit_tiny", "patch_size": 8, "depth": 2}, None, 32)
    for name, value in reference.state_dict().items():
        assert torch.equal(classifier.backbone.state_dict()[name], value), name
