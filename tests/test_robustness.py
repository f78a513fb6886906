"""Robustness stages (downstream/robustness): ImageNet-C error/mCE arithmetic, ImageNet-A/R class
subsets, ImageNet-9 prediction mapping, occlusion patch sets and token dropping, each stage end to
end through its CLI on tiny fixtures (vit_tiny, depth 2, patch 8, 32 px), config schema, rules."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downstream.engine.features import feature_dim, linear_features
from downstream.engine.linear import LinearClassifier, LinearHead, read_head
from downstream.robustness import bg_challenge, class_subset, imagenet_c, occlusion
from downstream.robustness.common import RobustnessError, folder_samples, load_model
from downstream.robustness.occlusion import logits_from_kept_tokens
from helpers import run_stage
from ibot.checkpoint import BackboneCheckpoint, CheckpointError, export_backbone, save_atomic, sha256_file
from ibot.config import ConfigError, validate_config
from ibot.data.corruptions import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS
from ibot.metrics import read_metrics
from ibot.models.vision_transformer import build_backbone
from ibot.stages import stage_defaults

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n02085620", "n02123045"]  # head classes, sorted (= ImageFolder order)
ARCH = ["--arch", "vit_tiny", "--patch-size", "8", "--depth", "2"]
DEBUG = ["--resources", json.dumps({"cluster": "debug"})]
torch.set_num_threads(1)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_post_mortem(monkeypatch) -> None:
    """submitit's debug cluster opens pdb on a job exception; let the exception propagate instead."""
    monkeypatch.setattr("pdb.post_mortem", lambda *args, **kwargs: None)


def _image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


HEAD_PROTOCOL = "cls(last 1),sgd,1ep,lr-sweep(1),36/32"


def _head(path: Path, *, n_last_blocks: int = 1, avgpool: bool | int = False, seed: int = 0,
          dim: int | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    dim = dim or feature_dim(192, n_last_blocks, avgpool)
    state = {"weight": torch.randn(len(WNIDS), dim, generator=generator) * 0.5,
             "bias": torch.randn(len(WNIDS), generator=generator) * 0.1}
    meta = {"n_last_blocks": n_last_blocks, "avgpool_patchtokens": avgpool, "num_classes": len(WNIDS), "lr": 0.01,
            "epoch": 1, "classes": list(WNIDS), "resize": 36, "crop": 32, "protocol": HEAD_PROTOCOL}
    save_atomic({"state_dict": state, "meta": meta}, path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Backbone checkpoint, linear head and tiny datasets in the real layouts."""
    root = tmp_path_factory.mktemp("robustness")
    torch.manual_seed(0)
    export_backbone(build_backbone("vit_tiny", patch_size=8, depth=2, img_size=32, masked_im_modeling=False),
                    root / "backbone.pth",
                    meta={"arch": "vit_tiny"})
    _head(root / "head.pth")
    seed = iter(range(10_000))
    for wnid in WNIDS:  # ImageNet val: 3 classes x 3 images (40 px, resized 36 + crop 32)
        for i in range(3):
            _image(root / "imagenet" / "val" / wnid / f"{wnid}_{i}.JPEG", (40, 40), next(seed))
    for corruption in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS:  # ImageNet-C: 19 x 5 x 3 classes x 1 image
        for severity in range(1, 6):
            for wnid in WNIDS:
                _image(root / "imagenet_c" / corruption / str(severity) / wnid / "a.png", (32, 32), next(seed))
    for wnid in WNIDS[1:]:  # ImageNet-A: 2 of the 3 head classes
        for i in range(3):
            _image(root / "imagenet_a" / wnid / f"{i}.jpg", (48, 40), next(seed))
    for variant in bg_challenge.VARIANTS:  # ImageNet-9: super-classes 0 and 1
        for folder in ("00_dog", "01_bird"):
            for i in range(2):
                _image(root / "imagenet_9" / variant / "val" / folder / f"{i}.JPEG", (32, 32), next(seed))
    (root / "imagenet_9" / "in_to_in9.json").write_text(json.dumps({"0": 8, "1": 0, "2": -1}))
    return {"root": root, "checkpoint": root / "backbone.pth", "head": root / "head.pth"}


def _cli(stage: str, tiny, data: Path | str, out: Path, config: dict | None = None):
    argv = ["--checkpoint", str(tiny["checkpoint"]), *ARCH, "--data", str(data), "--out", str(out),
            "--head", str(tiny["head"]), "--config", json.dumps(config or {}), *DEBUG, "--run", "test"]
    return run_stage(stage, argv)


def _model(tiny, head: Path | None = None) -> LinearClassifier:
    spec = {"arch": "vit_tiny", "patch_size": 8, "depth": 2}
    return load_model(spec, BackboneCheckpoint(tiny["checkpoint"]), head or tiny["head"], device=torch.device("cpu"))


# -- ImageNet-C arithmetic -----------------------------------------------------------------------
def test_alexnet_baseline_covers_the_15_benchmark_corruptions() -> None:
    assert list(imagenet_c.ALEXNET_ERRORS) == list(BENCHMARK_CORRUPTIONS)
    assert imagenet_c.ALL_CORRUPTIONS[15:] == ("speckle_noise", "gaussian_blur", "spatter", "saturate")


def test_mce_hand_computed() -> None:
    # Benchmark corruptions at exactly AlexNet's error (CE_c = 1), the 4 extra ones at 50 % error.
    errors = {c: {s: imagenet_c.ALEXNET_ERRORS[c] for s in range(1, 6)} for c in BENCHMARK_CORRUPTIONS}
    errors.update({c: {s: 0.5 for s in range(1, 6)} for c in EXTRA_CORRUPTIONS})
    metrics, per_corruption = imagenet_c.summarise(errors)
    # sum of the 15 AlexNet errors = 11.834896 (by hand)
    assert metrics["mCE_alexnet_15"] == pytest.approx(100.0)
    assert metrics["mean_error_15"] == pytest.approx(100 * 11.834896 / 15)            # 78.8993
    assert metrics["mean_error_19"] == pytest.approx(100 * (11.834896 + 4 * 0.5) / 19)  # 72.8152
    assert set(metrics) == {"mCE_alexnet_15", "mean_error_15", "mean_error_19"}
    assert per_corruption["spatter"] == pytest.approx(50.0)

    # Errors varying with severity: 0.1..0.5 (mean 0.3) everywhere; contrast at half AlexNet's error.
    errors = {c: {s: s / 10 for s in range(1, 6)} for c in imagenet_c.ALL_CORRUPTIONS}
    errors["contrast"] = {s: imagenet_c.ALEXNET_ERRORS["contrast"] / 2 for s in range(1, 6)}
    metrics, _ = imagenet_c.summarise(errors)
    contrast = imagenet_c.ALEXNET_ERRORS["contrast"] / 2
    assert metrics["mean_error_19"] == pytest.approx(100 * (18 * 0.3 + contrast) / 19)
    ces = [0.3 / imagenet_c.ALEXNET_ERRORS[c] for c in BENCHMARK_CORRUPTIONS if c != "contrast"] + [0.5]
    assert metrics["mCE_alexnet_15"] == pytest.approx(100 * sum(ces) / 15)

    # Only one corruption evaluated: no 19/15 summaries, the "evaluated" ones instead.
    metrics, _ = imagenet_c.summarise({"gaussian_noise": {s: s / 10 for s in range(1, 6)}})
    assert metrics == pytest.approx({"mean_error_evaluated": 30.0, "mCE_alexnet_evaluated": 100 * 0.3 / 0.886428})


# -- ImageNet-A/R class subsets and ImageNet-9 mapping --------------------------------------------
def test_class_subset_mapping() -> None:
    head_classes = ["n03", "n01", "n04", "n02"]  # any order: the subset goes through the wnid list
    indices = class_subset.subset_indices(["n01", "n02"], head_classes, what="test")
    assert indices == [1, 3]
    logits = torch.tensor([[0.0, 1.0, 9.0, 2.0], [0.0, 3.0, 9.0, 2.0]])
    assert logits[:, indices].argmax(-1).tolist() == [1, 0]  # n04 (global argmax) is not a candidate
    with pytest.raises(RobustnessError, match="n09"):
        class_subset.subset_indices(["n01", "n09"], head_classes, what="ImageNet-A")
    assert stage_defaults("imagenet_r") == stage_defaults("imagenet_a")


def test_in9_mapping_follows_official_argmax_then_map(tmp_path) -> None:
    path = tmp_path / "in_to_in9.json"
    path.write_text(json.dumps({"0": 0, "1": 0, "2": 1, "3": -1}))
    lut = bg_challenge.load_in9_map(path, 4)
    assert lut.tolist() == [0, 0, 1, -1]
    logits = torch.tensor([[4.0, 4.0, 5.0, 0.0],    # argmax class 2 -> IN-9 1 (summing per super-class would say 0)
                           [3.0, 0.0, 0.0, 1.0],    # class 0 -> 0
                           [0.0, 0.0, 1.0, 7.0]])   # class 3 -> -1: wrong whatever the label
    predictions = bg_challenge.map_to_in9(logits, lut)
    assert predictions.tolist() == [1, 0, -1]
    assert predictions.eq(torch.tensor([1, 0, 0])).tolist() == [True, True, False]
    with pytest.raises(RobustnessError, match="no entry for head classes"):
        bg_challenge.load_in9_map(path, 5)
    assert [bg_challenge.in9_label(f) for f in ("00_dog", "08_fish", "3_reptile")] == [0, 8, 3]
    with pytest.raises(RobustnessError):
        bg_challenge.in9_label("dog")


def test_folder_samples_follow_torchvision_order_and_suffixes(tmp_path) -> None:
    """Classes sorted, files sorted within a class (torchvision's make_dataset), labels from the given
    map, torchvision's IMG_EXTENSIONS in any case; hidden files and folders and non-images are skipped."""
    for rel in ("b/2.png", "b/1.JPEG", "a/x.webp", "a/.y.jpg", "a/notes.txt", ".cache/z.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert folder_samples(tmp_path, {"a": 5, "b": 3}, what="t", group=2) == [
        (str(tmp_path / "a" / "x.webp"), 5, 2), (str(tmp_path / "b" / "1.JPEG"), 3, 2),
        (str(tmp_path / "b" / "2.png"), 3, 2)]
    assert [s[0] for s in folder_samples(tmp_path, {"a": 0, "b": 1}, what="t", max_per_class=1)] == [
        str(tmp_path / "a" / "x.webp"), str(tmp_path / "b" / "1.JPEG")]
    with pytest.raises(RobustnessError, match=r"class folders \['b'\] .* unknown"):
        folder_samples(tmp_path, {"a": 0}, what="t")


def test_bg_challenge_variants_are_the_generator_ones() -> None:
    from ibot.data.embedded import Layers, in9_variants
    from ibot.data.imagenet9 import IN9_CLASSES, IN9_VARIANTS

    assert bg_challenge.VARIANTS is IN9_VARIANTS and bg_challenge.NUM_IN9 == len(IN9_CLASSES) == 9
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 3:6] = True
    layers = Layers(np.full((8, 8, 3), 50, np.uint8), np.full((8, 8, 3), 200, np.uint8), mask)
    assert tuple(in9_variants(layers, layers, layers, layers)) == IN9_VARIANTS


# -- occlusion -------------------------------------------------------------------------------------
def test_salient_and_nonsalient_sets_by_hand() -> None:
    sal = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64)  # ranking: 1 > 3 > 2 > 0
    # salient at r: drop p iff the mass ranked above p is < r (above: p1 0, p3 .4, p2 .7, p0 .9)
    assert occlusion.salient_drop(sal, 0.5).tolist() == [[False, True, False, True]]
    assert occlusion.salient_drop(sal, 0.4).tolist() == [[False, True, False, False]]
    assert occlusion.salient_drop(sal, 0.75).tolist() == [[False, True, True, True]]
    # non-salient at r keeps exactly the salient set at 1 - r
    assert occlusion.nonsalient_drop(sal, 0.5).tolist() == [[True, False, True, False]]
    assert occlusion.nonsalient_drop(sal, 0.2).tolist() == [[True, False, False, False]]  # keeps salient(0.8)
    for fn in (occlusion.salient_drop, occlusion.nonsalient_drop):
        assert not fn(sal, 0.0).any() and fn(sal, 1.0).all()


def test_random_drop_and_shuffle_are_per_image() -> None:
    indices = torch.tensor([5, 9])
    drop = occlusion.random_drop(16, 0.5, indices, seed=0)
    assert drop.sum(1).tolist() == [8, 8]
    assert torch.equal(occlusion.random_drop(16, 0.5, indices[1:], seed=0)[0], drop[1])  # batch-independent
    assert (occlusion.random_drop(16, 0.75, indices, seed=0) >= drop).all()  # nested in the ratio
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    shuffled = occlusion.shuffle_patches(images, (2, 4), indices, seed=0)  # 2 rows x 4 columns of 4x2 px tiles
    assert not torch.equal(shuffled, images)

    def tiles(x):  # eval.py:147: 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' with h=2, w=4, p1=4, p2=2
        return sorted(map(tuple, x.reshape(2, 3, 2, 4, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 8, -1)[0].tolist()))

    assert tiles(shuffled) == tiles(images)  # a permutation of whole 4x2 tiles
    # analysis/eval_shuffle.sh:5-6: --shuffle_h 2 2 4 4 8 14 16 --shuffle_w 2 4 4 8 8 14 16
    assert occlusion.grid_sizes("official", 224) == ([(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (14, 14), (16, 16)], [])
    assert occlusion.grid_sizes("official", 32) == ([(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (16, 16)], ["14x14"])
    assert occlusion.grid_sizes([4, [2, 8]], 32) == ([(4, 4), (2, 8)], [])
    with pytest.raises(RobustnessError):
        occlusion.grid_sizes([3], 32)


def _eval_py_mask(attentions: torch.Tensor, drop_lambda: float) -> torch.Tensor:
    """bytedance/ibot analysis/occlusion/eval.py:178-184, transcribed (th_attn as bool)."""
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - drop_lambda)
    idx2 = torch.argsort(idx)
    for batch_idx in range(th_attn.shape[0]):
        th_attn[batch_idx] = th_attn[batch_idx][idx2[batch_idx]]
    return th_attn


def test_official_salient_mask_by_hand() -> None:
    """Ascending sort, normalise, cumulative mass > 1 - λ (eval.py:178-184); the attention is not normalised."""
    attention = torch.tensor([[0.2, 0.8, 0.4, 0.6]])  # normalised .1 .4 .2 .3; ascending cumsum: p0 .1, p2 .3, p3 .6, p1 1
    assert occlusion.official_salient_mask(attention, 0.5).tolist() == [[False, True, False, True]]  # > .5: p3, p1
    assert occlusion.official_salient_mask(attention, 0.3).tolist() == [[False, True, False, False]]  # > .7: p1
    assert occlusion.official_salient_mask(attention, 0.75).tolist() == [[False, True, True, True]]  # > .25
    assert not occlusion.official_salient_mask(attention, 0.0).any() and occlusion.official_salient_mask(attention, 1).all()
    # salient drops the set, nonsalient keeps only it: at 0.5 the two are complementary
    assert occlusion._official_drop("nonsalient", attention, 0.5, 2, torch.tensor([0]), 0).tolist() == \
        [[True, False, True, False]]
    # equal to the official code on random attention, and to the self_attention sets (same rule, other key)
    attention = torch.rand(6, 49, generator=torch.Generator().manual_seed(0)).softmax(-1)
    for lam in (0.1, 0.3, 0.5, 0.7, 0.9):
        official = occlusion.official_salient_mask(attention, lam)
        assert torch.equal(official, _eval_py_mask(attention.clone(), lam)), lam
        normalised = attention.double() / attention.double().sum(-1, keepdim=True)
        assert torch.equal(official, occlusion.salient_drop(normalised, lam)), lam


def test_official_mask_zeroes_nearest_upsampled_patches() -> None:
    """img * (1 - th_attn) / img * th_attn with th_attn upsampled nearest by the patch size (eval.py:191-197),
    on the normalised image: dropped pixels become exactly 0, the others keep their value."""
    import torch.nn.functional as F

    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    th_attn = torch.tensor([[True, False, False, True], [False, False, True, False]])  # 2 x 2 grid of 4-px patches
    upsampled = F.interpolate(th_attn.reshape(-1, 2, 2).float().unsqueeze(1), scale_factor=4, mode="nearest")
    salient = occlusion.zero_patches(images, th_attn, 4)
    nonsalient = occlusion.zero_patches(images, ~th_attn, 4)
    assert torch.equal(salient, images * (1 - upsampled)) and torch.equal(nonsalient, images * upsampled)
    assert (salient[0, :, :4, :4] == 0).all() and (salient[0, :, 4:, 4:] == 0).all()
    assert torch.equal(salient[0, :, :4, 4:], images[0, :, :4, 4:]) and torch.equal(salient[1, :, :4, :], images[1, :, :4, :])
    assert (nonsalient[1, :, :4, :] == 0).all() and torch.equal(nonsalient[1, :, 4:, :4], images[1, :, 4:, :4])


def test_official_random_drop_counts_as_eval_py() -> None:
    """eval.py:336: drop_count = k * 196 // 10 (floor); the self_attention variant rounds."""
    indices = torch.arange(3)
    assert [int(occlusion.random_drop(196, k / 10, indices, 0, floor=True)[0].sum()) for k in range(10)] == \
        [k * 196 // 10 for k in range(10)]
    assert int(occlusion.random_drop(196, 0.1, indices, 0)[0].sum()) == 20  # round(19.6)


@pytest.mark.parametrize("n_last_blocks,avgpool", [(1, False), (2, False), (1, True), (2, 1)])
def test_token_drop_matches_unpadded_forward(tiny, tmp_path, n_last_blocks, avgpool) -> None:
    _head(tmp_path / "head.pth", n_last_blocks=n_last_blocks, avgpool=avgpool, seed=1)
    net = _model(tiny, tmp_path / "head.pth")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        clean = net(images)
        all_kept = logits_from_kept_tokens(net, images, torch.ones(4, 16, dtype=torch.bool))
        assert torch.allclose(all_kept, clean, atol=1e-5)
        keep = torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) < torch.tensor([[0.2], [0.5], [0.9], [0.0]])
        batched = logits_from_kept_tokens(net, images, keep)  # padded + masked batch
        for row in range(4):  # reference: one image, a sequence of exactly its kept tokens
            single = logits_from_kept_tokens(net, images[row:row + 1], keep[row:row + 1])
            assert torch.allclose(batched[row], single[0], atol=1e-4), row
        dropped_all = logits_from_kept_tokens(net, images, torch.zeros(4, 16, dtype=torch.bool))
    # every patch dropped: the prediction comes from [CLS] alone, identical for all images
    assert torch.allclose(dropped_all, dropped_all[:1].expand_as(dropped_all), atol=1e-5)
    features = linear_features(net.backbone, images, n_last_blocks, avgpool)  # the linear stage's own features
    assert torch.allclose(net.linear(features), clean, atol=1e-5)


def test_head_validation(tiny, tmp_path) -> None:
    save_atomic({"state_dict": {"weight": torch.zeros(3, 192)}, "meta": {}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing"):
        read_head(tmp_path / "bad.pth")
    with pytest.raises(RobustnessError, match="missing"):  # what a robustness stage reports
        load_model({"arch": "vit_tiny", "patch_size": 8, "depth": 2}, None, tmp_path / "bad.pth",
                   device=torch.device("cpu"))
    _head(tmp_path / "wide.pth", n_last_blocks=1, dim=384)  # e.g. a head of another architecture
    with pytest.raises(RobustnessError, match="does not fit"):
        _model(tiny, tmp_path / "wide.pth")
    _head(tmp_path / "deep.pth", n_last_blocks=4)  # the backbone has 2 blocks
    with pytest.raises(RobustnessError, match="n_last_blocks"):
        _model(tiny, tmp_path / "deep.pth")
    head = read_head(tiny["head"])
    assert isinstance(head, LinearHead) and head.classes == WNIDS and head.num_classes == 3


def test_random_init_backbone_matches_linear_stage(tiny) -> None:
    """weights: random baselines: the backbone rebuilt here equals the one the linear stage trained on
    (downstream.linear.run: seed_everything(seed), then build_eval_backbone)."""
    from downstream.engine.setup import build_eval_backbone, seed_everything
    from ibot.checkpoint import load_file
    spec = {"arch": "vit_tiny", "patch_size": 8, "depth": 2}
    meta = load_file(tiny["head"])["meta"]  # the linear stage records its seed and crop in the head
    seed_everything(int(meta.get("seed", 0)))
    reference = build_eval_backbone(spec, None, int(meta.get("crop", 224))).state_dict()
    torch.manual_seed(123)  # unrelated RNG state before loading
    rebuilt = load_model(spec, None, tiny["head"], device=torch.device("cpu"), seed=3).backbone.state_dict()
    assert reference.keys() == rebuilt.keys() and all(torch.equal(reference[k], rebuilt[k]) for k in reference)


# -- stages end to end -----------------------------------------------------------------------------
def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_imagenet_c_stage(tiny, tmp_path) -> None:
    out = tmp_path / "imagenet_c" / "metrics.json"
    metrics = _cli("imagenet_c", tiny, tiny["root"] / "imagenet_c", out, {"batch_size": 64, "num_workers": 0})
    record = read_metrics(out)
    assert record["stage"] == "imagenet_c" and record["task"] == "robustness" and record["protocol"] == f"linear-head[{HEAD_PROTOCOL}]"
    assert set(record["metrics"]) == {"mean_error_19", "mean_error_15", "mCE_alexnet_15"} == set(metrics)
    rows = _rows(out.with_name("per_corruption.csv"))
    assert len(rows) == 95 and all(int(r["n_images"]) == 3 for r in rows)
    assert record["metrics"]["mean_error_19"] == pytest.approx(np.mean([float(r["error"]) for r in rows]), abs=1e-3)
    assert record["extra"]["missing"] == [] and record["checkpoint"]["sha256"]


def test_imagenet_c_missing_corruptions(tiny, tmp_path) -> None:
    root = tmp_path / "partial_c"
    shutil.copytree(tiny["root"] / "imagenet_c" / "fog", root / "fog")
    out = tmp_path / "c" / "metrics.json"
    with pytest.raises(RobustnessError, match="allow_missing"):
        _cli("imagenet_c", tiny, root, out)
    metrics = _cli("imagenet_c", tiny, root, out, {"allow_missing": True, "num_workers": 0})
    record = read_metrics(out)
    assert set(metrics) == {"mean_error_evaluated", "mCE_alexnet_evaluated"}
    assert len(record["extra"]["missing"]) == 18 * 5 and "gaussian_noise/1" in record["extra"]["missing"]


def test_imagenet_a_stage(tiny, tmp_path) -> None:
    out = tmp_path / "imagenet_a" / "metrics.json"
    _cli("imagenet_a", tiny, tiny["root"] / "imagenet_a", out, {"num_workers": 0})
    record = read_metrics(out)
    assert set(record["metrics"]) == {"top1"} and record["dataset"] == "imagenet-a"
    # by hand: the same model, logits restricted to the 2 folder classes (head indices 1, 2)
    net = _model(tiny)
    from downstream.robustness.common import robustness_transform
    transform, _ = robustness_transform(stage_defaults("imagenet_a"), net.head.meta)
    correct = 0
    for label, wnid in enumerate(WNIDS[1:]):
        for path in sorted((tiny["root"] / "imagenet_a" / wnid).iterdir()):
            with torch.inference_mode():
                logits = net(transform(Image.open(path).convert("RGB"))[None])
            correct += int(logits[0, [1, 2]].argmax()) == label
    assert record["metrics"]["top1"] == pytest.approx(100 * correct / 6)


def test_imagenet_a_unknown_wnid(tiny, tmp_path) -> None:
    root = tmp_path / "a"
    _image(root / "n09999999" / "0.jpg", (32, 32), 0)
    with pytest.raises(RobustnessError, match="n09999999"):
        _cli("imagenet_a", tiny, root, tmp_path / "out" / "metrics.json")


def test_bg_challenge_stage(tiny, tmp_path) -> None:
    out = tmp_path / "bg" / "metrics.json"
    metrics = _cli("bg_challenge", tiny, tiny["root"] / "imagenet_9", out, {"num_workers": 0})
    record = read_metrics(out)
    assert set(record["metrics"]) == set(bg_challenge.VARIANTS) | {"bg_gap"} == set(metrics)
    assert metrics["bg_gap"] == pytest.approx(metrics["mixed_same"] - metrics["mixed_rand"])
    assert record["extra"]["num_images"]["original"] == 4 and record["extra"]["head_classes_mapped"] == 2


def test_occlusion_stage(tiny, tmp_path) -> None:
    out = tmp_path / "occlusion" / "metrics.json"
    metrics = _cli("occlusion", tiny, tiny["root"] / "imagenet", out,
                   {"protocol": "self_attention", "num_workers": 0, "batch_size": 4})
    record = read_metrics(out)
    assert set(record["metrics"]) == {"clean_top1", "salient_0.5", "nonsalient_0.5", "random_0.5"} == set(metrics)
    rows = _rows(out.with_name("curves.csv"))
    assert len(rows) == 3 * 11
    clean = record["metrics"]["clean_top1"]
    at = {(r["mode"], float(r["ratio"])): r for r in rows}
    for mode in occlusion.MODES:
        assert float(at[mode, 0.0]["top1"]) == pytest.approx(clean, abs=1e-3)  # nothing dropped = clean
        assert float(at[mode, 0.0]["dropped_patch_fraction"]) == 0.0
        assert float(at[mode, 1.0]["dropped_patch_fraction"]) == 1.0
    # ratio 1: [CLS] only -> one constant prediction for every image -> accuracy = its class's share (3/9)
    for mode in occlusion.MODES:
        assert float(at[mode, 1.0]["top1"]) == pytest.approx(100 / 3, abs=1e-3)
    assert [r["grid"] for r in _rows(out.with_name("shuffle.csv"))] == ["2x2", "2x4", "4x4", "4x8", "8x8", "16x16"]
    assert record["extra"]["shuffle_skipped"] == ["14x14"]  # does not divide the 32 px crop
    assert out.with_name("occlusion.png").stat().st_size > 1000
    assert record["extra"]["num_patches"] == 16 and record["extra"]["drop"] == "tokens"
    assert record["protocol"] == f"linear-head[{HEAD_PROTOCOL}],occlusion(drop=tokens,saliency=self-attention-mean)"
    assert record["extra"]["transform"]["interpolation"] == "bicubic"  # the head's eval, as before


def test_occlusion_zero_pixels_mode(tiny, tmp_path) -> None:
    out = tmp_path / "occ0" / "metrics.json"
    config = {"protocol": "self_attention", "num_workers": 0, "drop": "zero_pixels", "ratios": [0.0, 0.5],
              "modes": ["salient", "random"],
              "shuffle_grid_sizes": [], "attention_heads": 1}
    metrics = _cli("occlusion", tiny, tiny["root"] / "imagenet", out, config)
    assert set(metrics) == {"clean_top1", "salient_0.5", "random_0.5"}
    rows = _rows(out.with_name("curves.csv"))
    assert float(next(r for r in rows if r["mode"] == "salient" and float(r["ratio"]) == 0)["top1"]) == \
        pytest.approx(metrics["clean_top1"], abs=1e-3)
    assert _rows(out.with_name("shuffle.csv")) == []


def _official(tiny, **saliency) -> dict:
    spec = {"checkpoint": str(tiny["checkpoint"]), "arch": "vit_tiny", "patch_size": 8, "depth": 2,
            "checkpoint_key": None, "head": 1}
    return {"protocol": "official", "saliency_model": {**spec, **saliency}}


def test_saliency_model_loads_dino_ibot_and_exported_layouts(tiny, tmp_path) -> None:
    """The official saliency model goes through the one checkpoint loader: DINO's plain state dict, an iBOT
    training checkpoint (teacher/backbone.*) and our exported {'state_dict', 'meta'} give the same weights."""
    torch.manual_seed(1)
    source = build_backbone("vit_tiny", patch_size=8, depth=2, img_size=32, masked_im_modeling=False)
    reference = source.state_dict()
    dino = tmp_path / occlusion.DINO_VITS16_FILE  # the released file's name and layout (a plain state dict)
    torch.save(reference, dino)
    ibot = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in reference.items()}, "epoch": 3}, ibot)
    exported = tmp_path / "teacher_backbone.pth"
    export_backbone(source, exported, meta={"arch": "vit_tiny"})
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    spec = _official(tiny)["saliency_model"]
    for path in (dino, ibot, exported):
        model = occlusion.load_saliency_model({**spec, "checkpoint": str(path)}, 32, torch.device("cpu"))
        state = model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference), path.name
        attention = occlusion.head_attention(model, images, 1)
        assert attention.shape == (2, 16) and attention.dtype == torch.float32
        assert torch.allclose(attention, source.get_last_selfattention(images)[:, 1, 0, 1:])
    # our export renamed as DINO's release does not pass for it; a head the model lacks is refused
    renamed = tmp_path / "renamed" / occlusion.DINO_VITS16_FILE
    renamed.parent.mkdir()
    shutil.copy(exported, renamed)
    with pytest.raises(RobustnessError, match="named like DINO's release"):
        occlusion.load_saliency_model({**spec, "checkpoint": str(renamed)}, 32, torch.device("cpu"))
    with pytest.raises(RobustnessError, match="saliency_model.head: 3 out of range"):
        occlusion.load_saliency_model({**spec, "checkpoint": str(exported), "head": 3}, 32, torch.device("cpu"))
    with pytest.raises(RobustnessError, match="saliency_model.checkpoint .*vit_small"):
        occlusion.load_saliency_model({**spec, "checkpoint": str(exported), "arch": "vit_small"}, 32,
                                      torch.device("cpu"))


def test_official_without_saliency_checkpoint_fails_before_any_work(tiny, tmp_path, monkeypatch) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(occlusion, "prepare", no_work)
    out = tmp_path / "occ" / "metrics.json"
    with pytest.raises(RobustnessError, match=r"robustness\.occlusion\.saliency_model\.checkpoint.*"
                                              r"dino_deitsmall16_pretrain\.pth"):
        _cli("occlusion", tiny, tiny["root"] / "imagenet", out, {"num_workers": 0})  # default protocol: official
    for bad, match in (({"drop": "tokens"}, "drop"), ({"attention_heads": 0}, "attention_heads")):
        with pytest.raises(RobustnessError, match=match):  # keys of the other protocol are not silently ignored
            _cli("occlusion", tiny, tiny["root"] / "imagenet", out, {**_official(tiny), **bad})
    assert not out.exists()


def test_occlusion_official_stage_by_hand(tiny, tmp_path) -> None:
    """End to end: S.5 / NS.5 / random equal a by-hand run of eval.py's steps on the same normalised images
    (bilinear resize, separate saliency model's head 1, pixels zeroed); information loss recorded."""
    from torchvision.transforms import InterpolationMode, Resize

    from downstream.robustness.common import robustness_transform
    out = tmp_path / "official" / "metrics.json"
    config = {**_official(tiny), "num_workers": 0, "batch_size": 4, "ratios": [0.0, 0.5, 1.0], "shuffle_grid_sizes": []}
    metrics = _cli("occlusion", tiny, tiny["root"] / "imagenet", out, config)
    record = read_metrics(out)
    assert set(metrics) == {"clean_top1", "salient_0.5", "nonsalient_0.5", "random_0.5"} == set(record["metrics"])
    extra = record["extra"]
    assert extra["protocol"] == "official" and extra["drop"] == "zero_pixels" and extra["num_patches"] == 16
    assert extra["transform"]["interpolation"] == "bilinear"
    assert extra["saliency_model"]["sha256"] == sha256_file(tiny["checkpoint"]) and extra["saliency_model"]["head"] == 1

    net = _model(tiny)
    saliency_model = occlusion.load_saliency_model(config["saliency_model"], 32, torch.device("cpu"))
    transform, _ = robustness_transform(occlusion.resolve_config({**stage_defaults("occlusion"), **config}), net.head.meta)
    assert next(t for t in transform.transforms if isinstance(t, Resize)).interpolation == InterpolationMode.BILINEAR
    correct, loss = {"salient": 0, "nonsalient": 0}, {"salient": 0.0, "nonsalient": 0.0}
    for label, wnid in enumerate(WNIDS):
        for path in sorted((tiny["root"] / "imagenet" / "val" / wnid).iterdir()):
            image = transform(Image.open(path).convert("RGB"))[None]
            with torch.inference_mode():
                th_attn = _eval_py_mask(saliency_model.get_last_selfattention(image.clone())[:, 1, 0, 1:], 0.5)
                mask = th_attn.reshape(1, 1, 4, 4).float().repeat_interleave(8, 2).repeat_interleave(8, 3)
                for mode, occluded in (("salient", image * (1 - mask)), ("nonsalient", image * mask)):
                    correct[mode] += int(net(occluded).argmax(-1)) == label
                loss["salient"] += th_attn.float().mean().item() / 9
                loss["nonsalient"] += (1 - th_attn.float()).mean().item() / 9
    for mode in ("salient", "nonsalient"):
        assert record["metrics"][f"{mode}_0.5"] == pytest.approx(100 * correct[mode] / 9), mode
        assert extra["information_loss_0.5"][mode] == pytest.approx(loss[mode], abs=1e-6), mode
    assert extra["information_loss_0.5"]["random"] == pytest.approx(8 / 16)  # floor(0.5 * 16) patches
    at = {(r["mode"], float(r["ratio"])): r for r in _rows(out.with_name("curves.csv"))}
    clean = metrics["clean_top1"]
    for mode, ratio in (("salient", 0.0), ("nonsalient", 1.0), ("random", 0.0)):  # nothing removed = clean
        assert float(at[mode, ratio]["top1"]) == pytest.approx(clean, abs=1e-3) and \
            float(at[mode, ratio]["dropped_patch_fraction"]) == 0.0
    assert float(at["nonsalient", 0.0]["dropped_patch_fraction"]) == 1.0  # keeps mass 0: an all-zero image


def test_occlusion_protocol_labels(tiny, tmp_path) -> None:
    """The label says what ran; the official protocol with DINO's released ViT-S/16 (by file name, layout checked
    at load) is the paper's label in results/reference/paper_protocols.csv, any other saliency model is not."""
    from downstream.engine import linear
    from ibot.config import load_yaml, stage_config
    from ibot.results.aggregate import load_paper_protocols

    head_meta = {"protocol": HEAD_PROTOCOL}
    self_attention = {**stage_defaults("occlusion"), "protocol": "self_attention"}
    assert occlusion.protocol_label(self_attention, head_meta) == \
        f"linear-head[{HEAD_PROTOCOL}],occlusion(drop=tokens,saliency=self-attention-mean)"  # the former label
    assert occlusion.protocol_label({**self_attention, "drop": "zero_pixels", "attention_heads": 1,
                                     "interpolation": "bilinear", "crop": 32}, head_meta) == \
        f"linear-head[{HEAD_PROTOCOL}],occlusion(drop=zero_pixels,saliency=self-attention-1," \
        f"interpolation=bilinear,eval=head/32)"
    official = {**stage_defaults("occlusion"), **_official(tiny)}
    digest = sha256_file(tiny["checkpoint"])[:8]
    assert occlusion.protocol_label(official, head_meta) == (
        f"linear-head[{HEAD_PROTOCOL}],occlusion(protocol=official,drop=zero_pixels,"
        f"saliency=vit_tiny/8-d2:sha256={digest},head=1,interpolation=bilinear)")
    unset = {**stage_defaults("occlusion")}
    assert "saliency=vit_small/16:unset," in occlusion.protocol_label(unset, head_meta)

    config = validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO)
    linear_head = {"protocol": linear.protocol_label(stage_config(config, "linear", "vit_small"))}
    paper_config = stage_config(config, "occlusion", "vit_small")
    rows = load_paper_protocols()
    rows = rows[rows["stage"] == "occlusion"]
    assert len(rows) == 2
    dino = {**paper_config, "saliency_model": {**paper_config["saliency_model"],
                                               "checkpoint": f"/weights/{occlusion.DINO_VITS16_FILE}"}}
    assert set(rows["protocol"]) == {occlusion.protocol_label(dino, linear_head)}
    other = {**dino, "saliency_model": {**dino["saliency_model"], "checkpoint": str(tiny["checkpoint"])}}
    assert occlusion.protocol_label(other, linear_head) not in set(rows["protocol"])
    head0 = {**dino, "saliency_model": {**dino["saliency_model"], "head": 0}}
    assert occlusion.protocol_label(head0, linear_head) not in set(rows["protocol"])


# -- config schema and rules -----------------------------------------------------------------------
def _config(**robustness) -> dict:
    return {"run": "t", "models": {"m": {"arch": "vit_tiny", "patch_size": 8, "depth": 2}},
            "data": {"embedded": {}}, "stages": ["imagenet_c"], "robustness": robustness}


def test_config_validation() -> None:
    from ibot.config import stage_config
    config = validate_config(_config(occlusion={"ratios": [0.0, 0.5, 1.0], "saliency_model": {"head": 2}}),
                             base_dir=REPO)
    assert stage_config(config, "imagenet_c", "m") == stage_defaults("imagenet_c")  # defaults filled
    occlusion_config = stage_config(config, "occlusion", "m")
    assert occlusion_config["ratios"] == [0.0, 0.5, 1.0] and occlusion_config["protocol"] == "official"
    assert occlusion_config["saliency_model"] == {  # a nested key merges over the nested defaults
        "checkpoint": None, "arch": "vit_small", "patch_size": 16, "depth": None, "checkpoint_key": None, "head": 2}
    for bad in ({"imagenet_c": {"severity": [1]}}, {"occlusion": {"drop": "blur"}},
                {"occlusion": {"protocol": "dino"}}, {"occlusion": {"saliency_model": {"weights": "x.pth"}}},
                {"occlusion": {"saliency_model": {"arch": "vit_huge"}}}, {"occlusion": {"interpolation": "area"}},
                {"imagenet_c": {"corruptions": ["rain"]}}, {"bg_challenge": {"resize": "auto"}}):
        with pytest.raises(ConfigError):
            validate_config(_config(**bad), base_dir=REPO)


def test_rules_dry_run(tiny, tmp_path) -> None:
    import yaml
    config = _config(imagenet_a={"batch_size": 7})
    config["models"]["m"].update({"weights": "checkpoint", "checkpoint": str(tiny["checkpoint"]),
                                  "overrides": {"robustness": {"occlusion": {"ratios": [0.5]}}}})
    config["data"].update({k: str(tiny["root"] / v) for k, v in (("imagenet", "imagenet"), ("imagenet_c", "imagenet_c"),
                                                                 ("imagenet_a", "imagenet_a"), ("imagenet_9", "imagenet_9"))})
    config = validate_config(config, base_dir=REPO)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    head = tmp_path / "results" / "t" / "m" / "linear" / "head.pth"
    head.parent.mkdir(parents=True)
    shutil.copy(tiny["head"], head)
    stages = ["imagenet_c", "imagenet_a", "bg_challenge", "occlusion"]
    (tmp_path / "Snakefile").write_text(
        f'include: "{REPO}/workflow/rules/common.smk"\n'
        f'include: "{REPO}/workflow/rules/stages.smk"\n'
        f'rule all:\n    input: [stage_target(s, "m") for s in {stages!r}]\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "-p", "--cores", "1",
                             "--configfile", "config.yaml", "-s", "Snakefile"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    for stage in stages:
        assert f"rule {stage}:" in text and f"-m downstream {stage} " in text
    assert text.count("--head results/t/m/linear/head.pth") == len(stages)
    assert '"batch_size": 7' in text and '"ratios": [0.5]' in text


def test_metric_names_match_the_results_metric_map() -> None:
    """Every robustness metric the results tables read (results/reference/metric_map.csv) is written
    by its stage (names as asserted by the end-to-end tests above)."""
    path = REPO / "results" / "reference" / "metric_map.csv"  # tracked: missing is a failure
    produced = {"imagenet_c": {"mean_error_19", "mean_error_15", "mCE_alexnet_15"}, "imagenet_a": {"top1"},
                "imagenet_r": {"top1"}, "bg_challenge": set(bg_challenge.VARIANTS) | {"bg_gap"},
                "occlusion": {"clean_top1", "salient_0.5", "nonsalient_0.5", "random_0.5"}}
    wanted = [(r["stage"], r["metric"]) for r in _rows(path) if r["stage"] in produced]
    assert wanted and all(metric in produced[stage] for stage, metric in wanted), wanted


def test_a_head_without_its_protocol_is_refused_before_evaluating(tiny, tmp_path) -> None:
    """The robustness label names the head's linear protocol; a head that does not say it fails early."""
    saved = torch.load(tiny["head"], weights_only=True)
    del saved["meta"]["protocol"]
    old_head = tmp_path / "head.pth"
    save_atomic(saved, old_head)
    out = tmp_path / "out" / "metrics.json"
    with pytest.raises(RobustnessError, match="no 'protocol'.*rerun the linear stage"):
        _cli("imagenet_a", {**tiny, "head": old_head}, tiny["root"] / "imagenet_a", out)
    assert not out.exists()


def test_imagenet_a_and_r_resize_bilinear_as_the_official_script(tiny) -> None:
    """bytedance/ibot analysis/natural_adv_examples/eval.py:41: Resize(256) (torchvision default:
    bilinear) + CenterCrop(224); the other robustness stages keep the head's bicubic eval resize."""
    from torchvision.transforms import InterpolationMode, Resize

    from downstream.robustness.common import robustness_transform
    net = _model(tiny)
    self_attention = occlusion.resolve_config({**stage_defaults("occlusion"), "protocol": "self_attention"})
    for name, config, expected in (("imagenet_a", stage_defaults("imagenet_a"), InterpolationMode.BILINEAR),
                                   ("imagenet_r", stage_defaults("imagenet_r"), InterpolationMode.BILINEAR),
                                   ("occlusion official (eval.py:109)", occlusion.resolve_config(stage_defaults("occlusion")),
                                    InterpolationMode.BILINEAR),
                                   ("occlusion self_attention", self_attention, InterpolationMode.BICUBIC)):
        transform, sizes = robustness_transform(config, net.head.meta)
        resize = next(t for t in transform.transforms if isinstance(t, Resize))
        assert resize.interpolation == expected, name
        assert sizes["interpolation"] == expected.value
