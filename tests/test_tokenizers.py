"""Offline MIM targets (paper Tab. 9/20): tokenizers, k-means fitting, the target patch loss, pretraining."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torchvision import transforms

from ibot.checkpoint import export_backbone, export_heads, load_file
from ibot.data.embedded import EmbeddedSizes, generate
from ibot.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from ibot.loss import IBOTLoss
from ibot.tokenizers import (DalleTokenizer, KMeansTokenizer, MPPTokenizer, build_tokenizer, check_mim_config,
                             main as tokenizers_main)
from ibot.train.pretrain import Trainer, build_models
from test_pretrain import SPEC, TINY as PRETRAIN_TINY

#: test_pretrain's tiny recipe, one epoch without warm-ups
TINY = {**PRETRAIN_TINY, "epochs": 1, "warmup_epochs": 0, "warmup_teacher_temp_epochs": 0, "saveckp_freq": 0}
NORMALISE = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    sizes = EmbeddedSizes(classes=3, train_per_class=8, val_per_class=2, c_per_class=2, a_classes=2, image_size=32)
    return generate(root, seed=0, sets=["imagenet"], sizes=sizes)["imagenet"]


def _solid_patches(colours: list[list[tuple[int, int, int]]], patch: int = 16) -> torch.Tensor:
    """A uint8 image of solid ``patch``-px squares, normalised as the loader does -> [1, 3, H, W]."""
    rows = [torch.cat([torch.tensor(c, dtype=torch.uint8).view(3, 1, 1).expand(3, patch, patch) for c in row], 2)
            for row in colours]
    image = torch.cat(rows, 1).permute(1, 2, 0).numpy()  # H, W, 3 uint8
    return NORMALISE(image)[None]


def test_mpp_ids_of_known_colours():
    # channel value v -> level floor(v / 255 * 8): 0 -> 0, 40 -> 1, 100 -> 3, 200 -> 6, 255 -> 7
    image = _solid_patches([[(0, 0, 0), (255, 255, 255)], [(40, 100, 200), (200, 0, 100)]])
    ids = MPPTokenizer(16).tokenize(image)
    assert ids.shape == (1, 2, 2) and ids.dtype == torch.long
    assert ids[0].tolist() == [[0, 511], [1 * 64 + 3 * 8 + 6, 6 * 64 + 0 * 8 + 3]]
    # a patch's id is its mean colour's: 8-px quarters of 0 and 200 -> mean 100 -> level 3 -> 219
    mixed = _solid_patches([[(0, 0, 0), (200, 200, 200)], [(200, 200, 200), (0, 0, 0)]], patch=8)
    assert MPPTokenizer(16).tokenize(mixed).item() == 3 * 64 + 3 * 8 + 3
    assert MPPTokenizer(16).vocab_size == 512


def test_kmeans_assigns_nearest_hand_placed_centroid(tmp_path):
    p = 2
    centroids = torch.stack([torch.zeros(12), torch.full((12,), 0.5), torch.ones(12)])  # black, grey, white
    image = _solid_patches([[(255, 255, 255), (10, 10, 10)], [(120, 130, 125), (230, 240, 250)]], patch=p)
    tokenizer = KMeansTokenizer(centroids, p)
    assert tokenizer.tokenize(image)[0].tolist() == [[2, 0], [1, 2]]
    # (C, p, p) order: a centroid red in channel 0 only matches a red patch
    red = torch.cat([torch.ones(4), torch.zeros(8)])
    assert KMeansTokenizer(torch.stack([red, torch.zeros(12)]), p).tokenize(
        _solid_patches([[(255, 0, 0), (0, 0, 0)]], patch=p))[0].tolist() == [[0, 1]]
    with pytest.raises(ValueError, match=r"expected \[K, 12\]"):
        KMeansTokenizer(torch.zeros(3, 10), p)


def test_fit_kmeans_command_writes_centroids_and_metadata(imagenet, tmp_path):
    out = tmp_path / "tok" / "kmeans.pth"
    code = tokenizers_main(["fit-kmeans", "--data", str(imagenet), "--out", str(out), "--k", "8", "--fraction", "0.5",
                            "--patch-size", "8", "--crop", "32", "--seed", "0", "--max-patches", "100",
                            "--batch-size", "32", "--epochs", "2"])
    assert code == 0
    saved = load_file(out)  # weights_only
    assert saved["centroids"].shape == (8, 3 * 8 * 8) and saved["centroids"].dtype == torch.float32
    assert 0.0 <= saved["centroids"].min() and saved["centroids"].max() <= 1.0  # the [0, 1] pixel space
    meta = saved["meta"]
    assert meta["k"] == 8 and meta["patch_size"] == 8 and meta["crop"] == 32 and meta["seed"] == 0
    assert meta["fraction"] == 0.5 and meta["images"] == math.ceil(0.5 * 24) and meta["patches"] == 100
    # seeded: the same command gives the same centroids
    again = tmp_path / "again.pth"
    tokenizers_main(["fit-kmeans", "--data", str(imagenet), "--out", str(again), "--k", "8", "--fraction", "0.5",
                     "--patch-size", "8", "--crop", "32", "--max-patches", "100", "--batch-size", "32", "--epochs", "2"])
    assert torch.equal(load_file(again)["centroids"], saved["centroids"])
    tokenizer = build_tokenizer("kmeans", out, patch_size=8, crop=32)
    assert tokenizer.vocab_size == 8 and tokenizer.tokenize(torch.randn(2, 3, 32, 32)).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="fitted on 8-px patches"):
        build_tokenizer("kmeans", out, patch_size=16, crop=32)
    assert tokenizers_main(["fit-kmeans", "--data", str(tmp_path / "none"), "--out", str(again)]) == 2


def _export_pretraining(tmp_path, cfg=TINY):
    """A pretraining export (teacher_backbone.pth + heads.pth) of freshly built models."""
    torch.manual_seed(0)
    student, teacher = build_models(cfg, SPEC)
    meta = {**SPEC, "epochs": 0}
    path = tmp_path / "pretrain" / "teacher_backbone.pth"
    export_backbone(teacher.backbone, path, {**meta, "network": "teacher"})
    export_heads({"teacher": teacher.head, "student": student.head}, path.with_name("heads.pth"),
                 {**meta, "out_dim": cfg["out_dim"], "patch_out_dim": cfg["patch_out_dim"]})
    return path, teacher


def test_frozen_tokenizer_is_argmax_of_teacher_patch_logits(tmp_path):
    path, teacher = _export_pretraining(tmp_path)
    tokenizer = build_tokenizer("frozen", path, patch_size=8, crop=32)
    assert tokenizer.vocab_size == teacher.head.patch_out_dim == 128  # shared teacher head: out_dim
    images = torch.randn(3, 3, 32, 32)
    teacher.eval()
    with torch.no_grad():
        expected = teacher.head.forward_patch(teacher.backbone(images)[:, 1:]).argmax(-1).view(3, 4, 4)
    assert torch.equal(tokenizer.tokenize(images), expected)
    assert not any(p.requires_grad for p in tokenizer.parameters())
    with pytest.raises(ValueError, match="mask grid"):
        build_tokenizer("frozen", path, patch_size=16, crop=32)


def test_dalle_tokenizer_from_pickled_encoder(tmp_path):
    pytest.importorskip("dall_e", reason="optional extra [dalle]: pip install DALL-E==0.1")
    from dall_e import map_pixels
    from dall_e.encoder import Encoder

    torch.manual_seed(0)
    encoder = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    path = tmp_path / "encoder.pkl"
    torch.save(encoder, path)  # a pickled whole module, as the release
    tokenizer = DalleTokenizer.load(path, patch_size=16)
    assert tokenizer.vocab_size == 512
    images = torch.randn(2, 3, 32, 32)
    ids = tokenizer.tokenize(images)
    assert ids.shape == (2, 2, 2)  # 32 px -> 16 px encoder input -> 8x down -> the 2x2 patch grid
    pixels = (images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    pixels = torch.nn.functional.interpolate(pixels.clamp(0, 1), size=(16, 16), mode="bicubic", antialias=True)
    with torch.no_grad():
        expected = encoder(map_pixels(pixels.clamp(0, 1))).argmax(1)
    assert torch.equal(ids, expected)
    # anything beyond the dall_e encoder classes is refused (weights_only, never a free unpickle)
    other = tmp_path / "other.pkl"
    torch.save(torch.nn.Linear(2, 2), other)
    with pytest.raises(ValueError, match="weights_only"):
        DalleTokenizer.load(other, patch_size=16)


def test_dalle_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dall_e", None)
    monkeypatch.setitem(sys.modules, "dall_e.encoder", None)
    with pytest.raises(ImportError, match="pip install 'DALL-E==0.1'"):
        build_tokenizer("dalle", tmp_path / "encoder.pkl", patch_size=16, crop=224)


def test_target_patch_loss_hand_computed():
    loss = IBOTLoss(4, 2, ngcrops=1, nlcrops=0, warmup_teacher_temp=0.04, teacher_temp=0.04,
                    warmup_teacher_temp2=0.04, teacher_temp2=0.04, warmup_teacher_temp_epochs=0, nepochs=1,
                    lambda2=0.5)
    mask = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    # student_temp 0.1: logits (0, 0.1 ln 3) -> p = (1/4, 3/4); logits (0, 0) -> (1/2, 1/2)
    rows = torch.tensor([[0.0, 0.1 * math.log(3)], [0.0, 0.1 * math.log(3)], [0.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    expected = ((math.log(4) + math.log(4 / 3)) / 2 + 0.0 + math.log(2)) / 3 * 0.5
    assert loss.target_patch_loss(rows, targets, mask).item() == pytest.approx(expected, rel=1e-6)
    # the full-grid layouts give the same value
    grid_logits = torch.zeros(3, 3, 2)
    grid_logits[mask] = rows
    grid_targets = torch.zeros(3, 3, dtype=torch.long)
    grid_targets[mask] = targets
    assert loss.target_patch_loss(grid_logits, grid_targets, mask).item() == pytest.approx(expected, rel=1e-6)
    # through forward: the patch term is the target loss
    out = loss((torch.zeros(3, 4), rows), (torch.zeros(3, 4), torch.zeros(3, 2)), None, mask, 0,
               teacher_patch_mean=torch.zeros(3, 2), patch_targets=targets)
    assert out["patch"].item() == pytest.approx(expected, rel=1e-6)


def test_mim_config_and_vocabulary_checks(imagenet, tmp_path):
    with pytest.raises(ValueError, match="needs pretrain.mim_tokenizer"):
        check_mim_config({"mim_target": "kmeans", "mim_tokenizer": None})
    with pytest.raises(ValueError, match="uses no file"):
        check_mim_config({"mim_target": "online", "mim_tokenizer": "x.pth"})
    check_mim_config({"mim_target": "mpp", "mim_tokenizer": None})
    with pytest.raises(ValueError, match=r"pretrain\.patch_out_dim to 512"):
        Trainer({**TINY, "mim_target": "mpp", "shared_head_teacher": False}, SPEC, imagenet / "train", tmp_path)
    with pytest.raises(ValueError, match=r"set pretrain\.shared_head_teacher: false"):
        Trainer({**TINY, "mim_target": "mpp", "patch_out_dim": 512}, SPEC, imagenet / "train", tmp_path)
    with pytest.raises(ValueError, match=r"pretrain\.out_dim \(shared_head: true\) to 512"):
        Trainer({**TINY, "mim_target": "mpp", "shared_head": True}, SPEC, imagenet / "train", tmp_path)


@pytest.mark.parametrize("target", ["mpp", "kmeans", "frozen"])
def test_pretraining_step_with_offline_target(target, imagenet, tmp_path, one_thread):
    cfg = {**TINY}
    if target == "mpp":
        cfg.update(mim_target="mpp", patch_out_dim=512, shared_head_teacher=False)
    elif target == "kmeans":
        path = tmp_path / "kmeans.pth"
        assert tokenizers_main(["fit-kmeans", "--data", str(imagenet), "--out", str(path), "--k", "16",
                                "--patch-size", "8", "--crop", "32", "--max-patches", "200", "--batch-size", "64"]) == 0
        cfg.update(mim_target="kmeans", mim_tokenizer=str(path), patch_out_dim=16, shared_head_teacher=False)
    else:
        path, _ = _export_pretraining(tmp_path)
        cfg.update(mim_target="frozen", mim_tokenizer=str(path), patch_out_dim=128)
    trainer = Trainer(cfg, SPEC, imagenet / "train", tmp_path / "work")
    assert trainer.tokenizer is not None and trainer.tokenizer.vocab_size == cfg["patch_out_dim"]
    crops, _, masks = next(iter(trainer._loader(0)))
    row = trainer.train_step(crops, masks, 0, 0)
    assert math.isfinite(row["loss"]) and math.isfinite(row["patch"]) and row["patch"] > 0
