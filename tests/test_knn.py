"""k-NN stage: classifier vs a brute-force reference, CLI end to end, checkpoint formats, schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from downstream.engine import knn
from helpers import run_stage
from ibot.checkpoint import CheckpointError
from ibot.metrics import read_metrics
from ibot.models.vision_transformer import build_backbone
from ibot.stages import stage_defaults

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_tiny", "--depth", "2", "--patch-size", "8"]
DEFAULTS = stage_defaults("knn")
SMALL_CONFIG = {"resize": 36, "crop": 32, "batch_size_per_gpu": 8, "num_workers": 0}


def make_image_folder(root: Path, classes: int = 3, train: int = 6, val: int = 4, size: int = 32) -> Path:
    """ImageNet layout root/{train,val}/<wnid>/*.JPEG with one mean colour per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        colour = rng.integers(0, 256, 3)
        for split, count in (("train", train), ("val", val)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (colour + rng.normal(0, 30, (size, size, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG")
    return root


def official_checkpoint(path: Path, arch: str = "vit_tiny", depth: int = 2, patch: int = 8, img: int = 32) -> Path:
    """An official iBOT training checkpoint layout: {'teacher': {'backbone.<k>', 'head.*'}, ...}."""
    torch.manual_seed(1)
    # the official teacher has no mask token (only the student is built with masked_im_modeling)
    backbone = build_backbone(arch, patch_size=patch, img_size=img, depth=depth, masked_im_modeling=False)
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.randn(8, backbone.embed_dim)
    torch.save({"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 3}, path)
    return path


def brute_force_knn(train_f, train_y, test_f, test_y, k, T, num_classes):
    top1 = top5 = 0
    for feature, target in zip(test_f.tolist(), test_y.tolist()):
        sims = [sum(a * b for a, b in zip(feature, row)) for row in train_f.tolist()]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:min(k, len(sims))]
        scores = [0.0] * num_classes
        for j in order:
            scores[int(train_y[j])] += math.exp(sims[j] / T)
        ranked = sorted(range(num_classes), key=lambda c: -scores[c])
        top1 += ranked[0] == target
        top5 += target in ranked[:5]
    n = len(test_y)
    return 100.0 * top1 / n, 100.0 * top5 / n


def test_knn_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    num_classes, dim = 7, 16
    train_f = torch.nn.functional.normalize(torch.randn(60, dim, generator=gen, dtype=torch.float64), dim=1)
    test_f = torch.nn.functional.normalize(torch.randn(23, dim, generator=gen, dtype=torch.float64), dim=1)
    train_y = torch.randint(0, num_classes, (60,), generator=gen)
    test_y = torch.randint(0, num_classes, (23,), generator=gen)
    ks = [1, 5, 20, 200]  # 200 > 60 train samples: capped
    results = knn.knn_classifier(train_f, train_y, test_f, test_y, ks, temperature=0.07, num_classes=num_classes,
                                 chunk_size=5)  # chunks that do not divide the test set
    for k in ks:
        expected = brute_force_knn(train_f, train_y, test_f, test_y, k, 0.07, num_classes)
        assert results[k][0] == pytest.approx(expected[0]), k
        if k >= 20:  # with fewer neighbours, classes with zero votes tie and top-5 order is arbitrary
            assert results[k][1] == pytest.approx(expected[1]), k
    # one chunk or many: the same
    assert knn.knn_classifier(train_f, train_y, test_f, test_y, ks, num_classes=num_classes, chunk_size=1000) == results


def test_top5_only_with_five_classes() -> None:
    feats = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    labels = torch.arange(12) % 3
    (top1, top5), = knn.knn_classifier(feats, labels, feats, labels, [20], num_classes=3).values()
    assert top5 is None and 0.0 <= top1 <= 100.0


#: bytedance/ibot (commit da316d8) evaluation/eval_knn.py, run as ``run.sh imagenet_knn`` (run.sh:65-89),
#: transcribed with the line each value comes from.
OFFICIAL_EVAL_KNN = {
    "resize": (256, "eval_knn.py:67 Resize(256, interpolation=3)"),
    "crop": (224, "eval_knn.py:68 CenterCrop(224)"),
    "nb_knn": ([10, 20, 100, 200], "eval_knn.py:279 --nb_knn"),
    "temperature": (0.07, "eval_knn.py:281 --temperature"),
    "batch_size_per_gpu": (128, "eval_knn.py:278 --batch_size_per_gpu"),
    "num_workers": (10, "eval_knn.py:298 --num_workers"),
    "features_on_gpu": (True, "eval_knn.py:286 --use_cuda"),
    "chunk_size": (50000 // 100, "eval_knn.py:230-231: the 50,000 val images in 100 chunks"),
    "precision": ("fp32", "eval_knn.py:132-156: features computed without autocast"),
}


def test_defaults_equal_the_official_eval_knn_values() -> None:
    assert set(DEFAULTS) == set(OFFICIAL_EVAL_KNN)
    for key, (official, source) in OFFICIAL_EVAL_KNN.items():
        assert DEFAULTS[key] == official, f"knn.{key}: ours {DEFAULTS[key]!r}, official {official!r} ({source})"
    assert knn.REPORTED_K == 20  # paper Tab.1 k-NN column; eval_knn.py:280 "20 is usually working the best"


def test_schema_is_closed_and_requires_the_reported_k() -> None:
    import jsonschema
    schema = yaml.safe_load((ROOT / "workflow/schemas/knn.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    jsonschema.validate(DEFAULTS, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**DEFAULTS, "nb_knn": [10]}, schema)  # the reported k=20 is required


def test_cli_end_to_end_random_init(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imagenet")
    out = tmp_path / "results" / "knn" / "metrics.json"
    run_stage("knn", ["--data", str(data), "--out", str(out), "--config", json.dumps(SMALL_CONFIG),
              "--resources", '{"cluster": "debug"}', "--model", "tiny", *TINY])
    record = read_metrics(out)
    assert record["stage"] == "knn" and record["task"] == "knn" and record["model"] == "tiny"
    assert record["protocol"] == "k=20,T=0.07,cls,36/32" and record["dataset"] == "imagenet"
    assert set(record["metrics"]) == {"top1_k10", "top1_k20", "top1_k100", "top1_k200"}  # 3 classes: no top-5
    assert record["extra"]["effective_k"] == {"10": 10, "20": 18, "100": 18, "200": 18}
    assert record["checkpoint"] is None


def test_registry_launcher_runs_the_same_stage_without_torch_in_the_waiting_process(tmp_path: Path) -> None:
    """`python -m downstream knn` (what the Snakemake rules run) through a real local submitit job gives what
    it gives in-process; the waiting process never imports torch (one torch import per job)."""
    import subprocess
    import sys

    data = make_image_folder(tmp_path / "imagenet")
    args = ["--data", str(data), "--config", json.dumps(SMALL_CONFIG), "--model", "tiny", *TINY]
    run_stage("knn", [*args, "--out", str(tmp_path / "module" / "metrics.json"), "--resources", '{"cluster": "debug"}'])
    probe = ("import runpy, sys; sys.argv = ['downstream', *sys.argv[1:]]; runpy.run_module('downstream', "
             "run_name='__main__'); assert 'torch' not in sys.modules, 'the waiting process imported torch'")
    out = tmp_path / "registry" / "metrics.json"
    done = subprocess.run([sys.executable, "-c", probe, "knn", *args, "--out", str(out), "--resources",
                           '{"cluster": "local", "cpus_per_task": 1}'], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert read_metrics(out)["metrics"] == read_metrics(tmp_path / "module" / "metrics.json")["metrics"]
    unknown = subprocess.run([sys.executable, "-m", "downstream", "knnn"], cwd=ROOT, capture_output=True, text=True)
    assert unknown.returncode != 0 and "invalid choice: 'knnn'" in unknown.stderr


def test_official_checkpoint_and_wrong_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imagenet", train=3, val=2)
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "results" / "knn" / "metrics.json"
    run_stage("knn", ["--data", str(data), "--out", str(out), "--config", json.dumps(SMALL_CONFIG), "--checkpoint", str(ckpt),
              "--resources", '{"cluster": "debug"}', *TINY])
    record = read_metrics(out)
    assert record["checkpoint"]["path"] == str(ckpt) and len(record["checkpoint"]["sha256"]) == 64

    import pdb
    monkeypatch.setattr(pdb, "post_mortem", lambda *a, **k: None)  # submitit's debug executor opens pdb
    other = official_checkpoint(tmp_path / "small.pth", arch="vit_small")
    with pytest.raises(CheckpointError):
        run_stage("knn", ["--data", str(data), "--out", str(tmp_path / "bad" / "metrics.json"), "--checkpoint", str(other),
                  "--config", json.dumps(SMALL_CONFIG), "--resources", '{"cluster": "debug"}', *TINY])
