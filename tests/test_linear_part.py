"""Part-wise linear probing (official analysis/linear_part/eval.py): the top-k feature by hand and against the
official computation, grouped heads = separate sweeps, defaults = the official script's, the stage end to end
with resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from downstream.engine import linear
from downstream.engine.features import partwise_features
from helpers import run_stage
from ibot.metrics import read_metrics
from ibot.models.vision_transformer import build_backbone
from ibot.stages import stage_defaults
from test_knn import TINY, make_image_folder, official_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = stage_defaults("linear_part")


class _FixedBackbone(torch.nn.Module):
    """Returns given last-block tokens and attention (one image, 2 heads, 4 patches)."""

    def __init__(self, tokens: torch.Tensor, attention: torch.Tensor) -> None:
        super().__init__()
        self.tokens, self.attention, self.norm_calls = tokens, attention, []

    def get_last_tokens_and_selfattention(self, images: torch.Tensor, norm: bool = False):
        self.norm_calls.append(norm)
        return self.tokens, self.attention


def test_partwise_feature_by_hand() -> None:
    # [CLS] row of the attention to patches 0..3: head 0 (0.1, 0.5, 0.1, 0.3), head 1 (0.1, 0.3, 0.3, 0.3)
    # -> head mean (0.1, 0.4, 0.2, 0.3): ranking 1, 3, 2, 0
    attention = torch.zeros(1, 2, 5, 5)
    attention[0, 0, 0, 1:] = torch.tensor([0.1, 0.5, 0.1, 0.3])
    attention[0, 1, 0, 1:] = torch.tensor([0.1, 0.3, 0.3, 0.3])
    tokens = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [2.0, 4.0], [4.0, 8.0], [6.0, 2.0]]])  # [CLS], patches 0..3
    backbone = _FixedBackbone(tokens, attention)
    out = partwise_features(backbone, torch.zeros(1, 3, 8, 8), [1, 2, 4])
    assert out.shape == (3, 1, 2)
    assert out[0, 0].tolist() == [2.0, 4.0]                       # patch 1
    assert out[1, 0].tolist() == [4.0, 3.0]                       # mean of patches 1 and 3
    assert out[2, 0].tolist() == [3.25, 3.5]                      # every patch
    assert partwise_features(backbone, torch.zeros(1, 3, 8, 8), [1], reverse=True)[0, 0].tolist() == [1.0, 0.0]
    assert backbone.norm_calls == [False, False]                  # the official tokens: no final norm
    with pytest.raises(ValueError, match="5 patches asked"):
        partwise_features(backbone, torch.zeros(1, 3, 8, 8), [5])


def _official_partwise(backbone, images: torch.Tensor, k: int) -> torch.Tensor:
    """analysis/linear_part/eval.py:249-255 with its use_mean_pooling model (final norm = identity)."""
    x = backbone.prepare_tokens(images)
    for i, blk in enumerate(backbone.blocks):
        if i == len(backbone.blocks) - 1:
            attn = backbone._block_attention(blk, x)
        x = blk(x)
    attentions = attn[:, :, 0, 1:].mean(1)
    pos = attentions.topk(k, dim=-1)[1]
    output = x[:, 1:]
    pos = pos.unsqueeze(-1).repeat(1, 1, output.size(-1))
    return torch.gather(output, 1, pos).mean(1)


def test_partwise_feature_equals_the_official_computation() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = partwise_features(backbone, images, [1, 3, 16])
        for index, k in enumerate([1, 3, 16]):
            torch.testing.assert_close(ours[index], _official_partwise(backbone, images, k))
        tokens, attention = backbone.get_last_tokens_and_selfattention(images, norm=True)
        torch.testing.assert_close(tokens, backbone(images))
        torch.testing.assert_close(attention, backbone.get_last_selfattention(images))


def test_grouped_heads_equal_one_sweep_per_group() -> None:
    lrs, groups = [0.01, 1.0], 3
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(groups, 6, 12, generator=gen), torch.randint(0, 5, (6,), generator=gen))
               for _ in range(4)]
    kwargs = dict(batch_size=256, epochs=2, seed=3)
    grouped = linear.LinearSweep(12, 5, lrs, groups=groups, **kwargs)
    alone = [linear.LinearSweep(12, 5, lrs, **kwargs) for _ in range(groups)]
    assert grouped.lrs == lrs * groups and grouped.heads.group_of == [0, 0, 1, 1, 2, 2]
    for epoch in range(2):
        for features, targets in batches:
            losses = grouped.train_step(features, targets)
            for g, sweep in enumerate(alone):
                torch.testing.assert_close(losses[2 * g:2 * g + 2], sweep.train_step(features[g], targets))
        grouped.end_epoch()
        for sweep in alone:
            sweep.end_epoch()
    for head in range(len(grouped.lrs)):
        reference = alone[head // 2].head_state(head % 2)
        for key, value in grouped.head_state(head).items():
            torch.testing.assert_close(value, reference[key])


#: The official part-wise script's values (analysis/linear_part/eval.py, run.sh, eval_linear_part.sh).
OFFICIAL_LINEAR_PART = {
    "topk": ([1, 7, 14, 56, 112, 196], "run.sh:496 TOPK=(1 7 14 56 112 196)"),
    "reverse_top": (False, "eval.py:385 --reverse_top default False"),
    "final_norm": (False, "eval.py:118-121 use_mean_pooling=True: norm = nn.Identity (models/vision_transformer.py:160)"),
    "epochs": (100, "eval.py:366 --epochs 100"),
    "batch_size": (1024, "eval.py:371 128 per GPU x 8 (eval_linear_part.sh nproc_per_node=8)"),
    "momentum": (0.9, "eval.py:152 momentum=0.9"),
    "weight_decay": (0.0, "eval.py:132 sweep_lr_only: wds [0]"),
    "val_freq": (1, "eval.py:379 --val_freq 1"),
    "resize": (256, "eval.py:91 Resize(256, interpolation=3)"),
    "crop": (224, "eval.py:85,92 RandomResizedCrop(224) / CenterCrop(224)"),
    "train_interpolation": ("bilinear", "eval.py:85 torchvision's default"),
    "num_workers": (10, "eval.py:378 --num_workers 10"),
    "precision": ("fp32", "eval.py: no autocast"),
}


def test_defaults_equal_the_official_script() -> None:
    assert set(DEFAULTS) == set(OFFICIAL_LINEAR_PART) | {"lrs", "cache_val_features"}
    for key, (official, source) in OFFICIAL_LINEAR_PART.items():
        assert DEFAULTS[key] == official, f"linear_part.{key}: ours {DEFAULTS[key]!r}, official {official!r} ({source})"
    assert DEFAULTS["lrs"] is None and linear.OFFICIAL_LR_GRID[:3] == [1e-4, 2e-4, 3e-4]  # eval.py:127
    schema = yaml.safe_load((ROOT / "workflow/schemas/linear_part.schema.yaml").read_text())
    assert schema["additionalProperties"] is False


def test_stage_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imagenet")
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "results" / "linear_part" / "metrics.json"
    config = {**DEFAULTS, "resize": 36, "crop": 32, "batch_size": 8, "num_workers": 0, "epochs": 2,
              "lrs": [0.01, 0.3, 3.0], "topk": [1, 4, 16]}
    argv = ["--data", str(data), "--out", str(out), "--config", json.dumps(config), "--checkpoint", str(ckpt), *TINY]
    run_stage("linear_part", argv)
    record = read_metrics(out)
    assert record["task"] == "linear_part" and record["protocol"].startswith("top-k patches (k 1,4,16; no final norm)")
    assert set(record["metrics"]) == {"top1", "top1_k1", "top1_k4", "top1_k16"}  # 3 classes: no top-5
    assert record["metrics"]["top1"] == max(record["metrics"][f"top1_k{k}"] for k in (1, 4, 16))
    assert record["extra"]["best_k"] in (1, 4, 16) and record["extra"]["patches"] == 16
    with open(out.parent / "per_head.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 3 * 2 and {r["group"] for r in rows} == {"k1", "k4", "k16"}
    for k in (1, 4, 16):
        assert max(float(r["top1"]) for r in rows if r["group"] == f"k{k}") == record["metrics"][f"top1_k{k}"]
    # one class per mean colour: the probe beats chance (33 %)
    assert record["metrics"]["top1"] > 34.0 and record["baselines"]["top1"]["value"] == pytest.approx(100 / 3)

    out.unlink()
    monkeypatch.setattr(linear.LinearSweep, "train_step", lambda *a, **k: pytest.fail("retrained"))
    run_stage("linear_part", argv)
    assert read_metrics(out)["metrics"] == record["metrics"]


def test_topk_beyond_the_patch_count_is_refused(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imagenet", train=2, val=2)
    config = {**DEFAULTS, "resize": 36, "crop": 32, "batch_size": 4, "num_workers": 0, "epochs": 1, "lrs": [0.1],
              "topk": [1, 17]}
    with pytest.raises(ValueError, match=r"linear_part.topk: k = 17 but a 32 px crop has 16 patches"):
        run_stage("linear_part", ["--data", str(data), "--out", str(tmp_path / "m" / "metrics.json"),
                                  "--config", json.dumps(config), *TINY])
