"""Unsupervised classification (Tab.5) and the projection-head export/loader it needs: clustering metrics
against hand-computed cases, the rectangular Hungarian matching, heads.pth and official full-checkpoint
round trips, the pretraining export, the CLI end to end, the schema."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from downstream import unsupervised
from helpers import run_stage
from ibot.stages import stage_defaults
from ibot.checkpoint import (BackboneCheckpoint, CheckpointError, build_pretrained_head, export_heads, load_file,
                             load_backbone_weights, load_head_weights, locate_heads)
from ibot.metrics import read_metrics
from ibot.models.head import build_head
from ibot.models.vision_transformer import build_backbone
from test_knn import TINY, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = stage_defaults("unsupervised")
TINY_SPEC = {"arch": "vit_tiny", "patch_size": 8, "depth": 2}
HEAD_CFG = {"out_dim": 16, "patch_out_dim": 16, "head_hidden_dim": 32, "shared_head": True, "norm_last_layer": False}


def full_official_checkpoint(path: Path, img: int = 32, head_cfg: dict | None = None) -> Path:
    """The official iBOT ``checkpoint.pth`` layout (main_ibot.py:348-350): ``teacher`` = ``backbone.*`` +
    ``head.*``, ``student`` = the same under ``module.`` (DDP), the pickled ``args`` and training state."""
    cfg = {**HEAD_CFG, **(head_cfg or {})}
    torch.manual_seed(3)
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=img, depth=2, masked_im_modeling=False)
    teacher_head, student_head = build_head(192, cfg, teacher=True), build_head(192, cfg, teacher=False)
    with torch.no_grad():  # trained heads: not the unit gain of a fresh weight norm
        for param in [*teacher_head.parameters(), *student_head.parameters()]:
            param.normal_()
    teacher = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
               **{f"head.{k}": v for k, v in teacher_head.state_dict().items()}}
    student = {**{f"module.backbone.{k}": v for k, v in backbone.state_dict().items()},
               **{f"module.head.{k}": v for k, v in student_head.state_dict().items()}}
    args = argparse.Namespace(arch="vit_tiny", out_dim=cfg["out_dim"], patch_out_dim=cfg["patch_out_dim"],
                              shared_head=cfg["shared_head"], shared_head_teacher=True, norm_in_head=None,
                              act_in_head="gelu", norm_last_layer=cfg["norm_last_layer"])
    torch.save({"teacher": teacher, "student": student, "args": args, "epoch": 5, "optimizer": {"state": {}}}, path)
    return path


# -- metrics --------------------------------------------------------------------------------------------
def test_metrics_on_a_relabelled_perfect_clustering() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    clusters = np.array([7, 7, 3, 3, 500, 500, 500])  # the classes under another name
    assert unsupervised.clustering_metrics(labels, clusters) == pytest.approx(
        {"nmi": 100.0, "ari": 100.0, "fmi": 100.0, "acc": 100.0})
    accuracy, mapping = unsupervised.cluster_accuracy(labels, clusters)
    assert accuracy == 1.0 and mapping == {7: 0, 3: 1, 500: 2}


def test_metrics_against_hand_computed_values() -> None:
    # classes 0,0,0,1,1,1; clusters a,a,b,b,b,b: contingency a={0:2}, b={0:1, 1:3}
    labels = np.array([0, 0, 0, 1, 1, 1])
    clusters = np.array([4, 4, 9, 9, 9, 9])
    # pairs together in both: C(2,2) + C(3,2) = 4; in the same cluster: C(2,2) + C(4,2) = 7; same class: 3 + 3 = 6
    ari = (4 - 7 * 6 / 15) / ((7 + 6) / 2 - 7 * 6 / 15)
    fmi = 4 / math.sqrt(7 * 6)
    mi = (1 / 3) * math.log(2) + (1 / 6) * math.log(1 / 2) + (1 / 2) * math.log(3 / 2)
    h_labels, h_clusters = math.log(2), -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    nmi = mi / ((h_labels + h_clusters) / 2)  # scikit-learn's default arithmetic normalisation (unsup_cls.py:23)
    acc = (2 + 3) / 6  # a -> class 0, b -> class 1
    got = unsupervised.clustering_metrics(labels, clusters)
    assert got == pytest.approx({"nmi": 100 * nmi, "ari": 100 * ari, "fmi": 100 * fmi, "acc": 100 * acc})
    assert (round(ari, 4), round(fmi, 4), round(nmi, 4)) == (0.3243, 0.6172, 0.4787)


def test_rectangular_assignment_is_one_to_one() -> None:
    # more clusters than classes (the embedded out_dim 512 on 10 classes): one cluster per class
    assert unsupervised.cluster_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 2]))[0] == pytest.approx(3 / 4)
    # fewer clusters than classes: one class per cluster
    accuracy, mapping = unsupervised.cluster_accuracy(np.array([0, 1, 2, 2]), np.array([7, 7, 7, 7]))
    assert accuracy == pytest.approx(2 / 4) and mapping == {7: 2}


def _official_accuracy(labels: np.ndarray, clusters: np.ndarray, n: int) -> float:
    """unsup_cls.py:52-71 with the Munkres solve replaced by trying every permutation (square case)."""
    confusion = np.zeros((n, n))
    np.add.at(confusion, (labels, clusters), 1)
    cost = np.array([[confusion[:, j].sum() - confusion[i, j] for i in range(n)] for j in range(n)])  # cost[j, i]
    best = min(itertools.permutations(range(n)), key=lambda perm: sum(cost[j, perm[j]] for j in range(n)))
    return float(np.mean(np.array(best)[clusters] == labels))


def test_square_case_equals_the_official_matching() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 4, 40)
        clusters = np.where(rng.random(40) < 0.6, (labels + 1) % 4, rng.integers(0, 4, 40))
        labels[:4], clusters[:4] = np.arange(4), np.arange(4)  # every id occurs, as in the official confusion matrix
        assert unsupervised.cluster_accuracy(labels, clusters)[0] == pytest.approx(_official_accuracy(labels, clusters, 4))


# -- heads: export and loading --------------------------------------------------------------------------
def test_official_full_checkpoint_heads_load_strictly(tmp_path: Path) -> None:
    path = full_official_checkpoint(tmp_path / "checkpoint.pth")
    saved = load_file(path)  # torch.load(weights_only=True) with the globals official checkpoints pickle
    for key, prefix in (("teacher", "head."), ("student", "module.head.")):
        head = build_pretrained_head(path, key, 192)
        expected = {k[len(prefix):]: v for k, v in saved[key].items() if k.startswith(prefix)}
        assert set(head.state_dict()) == set(expected)
        for name, value in head.state_dict().items():
            assert torch.equal(value, expected[name]), (key, name)
        assert head.out_dim == 16 and head.last_layer2 is head.last_layer  # shared (README.md:71)
        fresh = build_head(192, HEAD_CFG, teacher=key == "teacher")
        load_head_weights(fresh, path, key)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), head.state_dict().values()))
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, masked_im_modeling=False)
    load_backbone_weights(backbone, path)  # the same file feeds the backbone (head.* ignored there)
    with pytest.raises(CheckpointError, match="does not match"):  # strict: another out_dim does not fit
        load_head_weights(build_head(192, {**HEAD_CFG, "out_dim": 8}, teacher=True), path)


def test_dino_head_layout_loads(tmp_path: Path) -> None:
    """A DINO full checkpoint's teacher head (mlp + last_layer, no patch branch; DINOHead as unsup_cls.py:111-114
    builds it) loads, and its [CLS] output is DINOHead's: mlp -> L2 norm -> last_layer."""
    torch.manual_seed(0)
    full = build_head(192, {**HEAD_CFG, "shared_head": True}, teacher=True)
    state = {f"head.{k}": v for k, v in full.state_dict().items() if not k.startswith("last_layer2.")}
    torch.save({"teacher": state, "args": argparse.Namespace(out_dim=16, use_bn_in_head=False)}, tmp_path / "dino.pth")
    head = build_pretrained_head(tmp_path / "dino.pth", "teacher", 192)
    x = torch.randn(4, 192)
    expected = full.last_layer(torch.nn.functional.normalize(full.mlp(x), dim=-1))
    assert torch.allclose(head.forward_cls(x), expected, atol=1e-6) and head.out_dim == 16


def test_heads_export_round_trip_and_backbone_only_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = {**HEAD_CFG, "shared_head": False}
    heads = {"teacher": build_head(192, cfg, teacher=True), "student": build_head(192, cfg, teacher=False)}
    export_heads(heads, tmp_path / "heads.pth", {**cfg, "embed_dim": 192})
    saved = torch.load(tmp_path / "heads.pth", weights_only=True)
    assert "head.mlp.0.weight" in saved["teacher"] and "head.last_layer.weight_g" in saved["student"]
    for key, head in heads.items():
        loaded = build_pretrained_head(tmp_path / "heads.pth", key, 192)
        assert set(loaded.state_dict()) == set(head.state_dict())
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in head.state_dict().items())
    assert build_pretrained_head(tmp_path / "heads.pth", "student", 192).last_layer2 is not None

    # heads.pth beside the exported backbone is found; a backbone-only file has no head
    (tmp_path / "teacher_backbone.pth").write_bytes(b"")
    assert locate_heads(None, tmp_path / "teacher_backbone.pth") == tmp_path / "heads.pth"
    assert locate_heads(None, tmp_path / "other" / "checkpoint.pth") == tmp_path / "other" / "checkpoint.pth"
    assert locate_heads("x.pth", None) == Path("x.pth") and locate_heads(None, None) is None
    torch.save({"state_dict": {"cls_token": torch.zeros(1, 1, 192)}}, tmp_path / "checkpoint_teacher.pth")
    with pytest.raises(CheckpointError, match="no 'teacher' network"):
        build_pretrained_head(tmp_path / "checkpoint_teacher.pth", None, 192)


def test_pretraining_exports_both_heads(tmp_path: Path) -> None:
    from ibot.data.embedded import EmbeddedSizes, generate
    sizes = EmbeddedSizes(classes=2, train_per_class=8, val_per_class=1, c_per_class=1, a_classes=1, image_size=32)
    images = generate(tmp_path / "data", seed=0, sets=["imagenet"], sizes=sizes)["imagenet"] / "train"
    cfg = {"epochs": 1, "batch_size_per_gpu": 8, "global_crops_size": 32, "local_crops_size": 16,
           "local_crops_number": 1, "num_workers": 0, "out_dim": 32, "patch_out_dim": 32, "head_hidden_dim": 64,
           "warmup_epochs": 0, "warmup_teacher_temp_epochs": 0, "saveckp_freq": 0, "precision": "fp32",
           "shared_head": True}
    run_stage("pretrain", ["--data", f"imagenet={images}", "--out", str(tmp_path / "pretrain" / "metrics.json"),
                           "--config", json.dumps(cfg), *TINY])
    work = torch.load(tmp_path / "pretrain" / "work" / "checkpoint.pth", weights_only=True)
    for key in ("teacher", "student"):  # = the heads of the training checkpoint (official names)
        head = build_pretrained_head(tmp_path / "pretrain" / "heads.pth", key, 192)
        trained = {k.removeprefix("module.")[len("head."):]: v for k, v in work[key].items()
                   if k.removeprefix("module.").startswith("head.")}
        assert trained and set(head.state_dict()) == set(trained)
        assert all(torch.equal(head.state_dict()[k], v) for k, v in trained.items())
    assert locate_heads(None, tmp_path / "pretrain" / "teacher_backbone.pth") == tmp_path / "pretrain" / "heads.pth"


# -- the stage ------------------------------------------------------------------------------------------
#: bytedance/ibot (da316d8) evaluation/unsupervised/unsup_cls.py via run.sh imagenet_unsup_cls (run.sh:213-225).
OFFICIAL_UNSUP_CLS = {
    "resize": (256, "unsup_cls.py:81 Resize(256, interpolation=3)"),
    "crop": (224, "unsup_cls.py:82 CenterCrop(224)"),
    "batch_size_per_gpu": (128, "unsup_cls.py:146"),
    "num_workers": (10, "unsup_cls.py:156"),
    "precision": ("fp32", "unsup_cls.py:126-135: no autocast"),
    "heads": (None, "ours: heads.pth beside the backbone, else the (official full) checkpoint itself"),
}


def test_defaults_and_schema() -> None:
    import jsonschema
    assert set(DEFAULTS) == set(OFFICIAL_UNSUP_CLS)
    for key, (official, source) in OFFICIAL_UNSUP_CLS.items():
        assert DEFAULTS[key] == official, f"unsupervised.{key} ({source})"
    schema = yaml.safe_load((ROOT / "workflow/schemas/unsupervised.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    jsonschema.validate(DEFAULTS, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**DEFAULTS, "out_dim": 1000}, schema)


def test_cli_end_to_end_with_an_official_checkpoint(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imagenet", train=2, val=4)
    ckpt = full_official_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "results" / "unsupervised" / "metrics.json"
    config = {"resize": 36, "crop": 32, "batch_size_per_gpu": 5, "num_workers": 0}
    argv = ["--data", str(data), "--out", str(out), "--config", json.dumps(config), "--checkpoint", str(ckpt),
            "--checkpoint-key", "teacher", "--resources", '{"cluster": "debug"}', "--model", "tiny", *TINY]
    run_stage("unsupervised", argv)
    record = read_metrics(out)
    assert record["stage"] == "unsupervised" and record["task"] == "unsup_cls" and record["dataset"] == "imagenet"
    assert set(record["metrics"]) == {"nmi", "ari", "fmi", "acc"} and record["protocol"] == (
        "teacher-cls-head-argmax,out_dim=16,36/32")
    assert record["extra"]["out_dim"] == 16 and record["extra"]["num_val"] == 12
    assert 1 <= record["extra"]["clusters_used"] <= 12 and 0.0 <= record["metrics"]["acc"] <= 100.0

    # the clusters are the argmax of the teacher head on the backbone's [CLS]: recompute them here
    from downstream.engine.data import eval_transform, image_folder
    from downstream.engine.setup import build_eval_backbone
    backbone = build_eval_backbone(TINY_SPEC, BackboneCheckpoint(ckpt, "teacher"), 32)
    head = build_pretrained_head(ckpt, "teacher", 192).eval()
    val = image_folder(data, "val", eval_transform(36, 32))
    with torch.no_grad():
        images = torch.stack([val[i][0] for i in range(len(val))])
        clusters = head.forward_cls(backbone(images)[:, 0]).argmax(-1).numpy()
    labels = np.array([val[i][1] for i in range(len(val))])
    assert record["metrics"] == pytest.approx(unsupervised.clustering_metrics(labels, clusters))

    # evidence: Wilson interval of ACC over the 12 images, the shuffled-clusters baseline of every metric
    assert record["intervals"]["acc"]["n"] == 12 and record["intervals"]["acc"]["method"] == "wilson"
    assert record["intervals"]["acc"]["low"] <= record["metrics"]["acc"] <= record["intervals"]["acc"]["high"]
    assert set(record["baselines"]) == {"nmi", "ari", "fmi", "acc"}
    assert record["baselines"]["acc"]["value"] >= 100.0 / 3  # 3 classes: a shuffle still matches a third

    # random init (no checkpoint): a random-init head of the official shape clusters (the baseline row)
    random_out = tmp_path / "r" / "metrics.json"
    run_stage("unsupervised", ["--data", str(data), "--out", str(random_out), "--config", json.dumps(config),
                               "--resources", '{"cluster": "debug"}', *TINY])
    random_record = read_metrics(random_out)
    assert random_record["extra"]["heads"] == "random init" and random_record["extra"]["out_dim"] == 8192
