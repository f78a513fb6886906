"""The paper's pretraining variants (IN-22K, no multi-crop, random masks, FT 512) as config/paper.yaml
resolves them: each plans its jobs and runs one embedded-size pretraining step with its own recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ibot.config import ConfigError, load_yaml, planned_stages, stage_config, stage_data, validate_config
from ibot.data.embedded import EmbeddedSizes, generate
from ibot.data.layouts import DatasetLayoutError, check_layout
from ibot.train.pretrain import Trainer

ROOT = Path(__file__).resolve().parents[1]
#: variant model -> what makes it the variant (resolved pretraining values), with the source.
VARIANTS: dict[str, dict[str, Any]] = {
    "vit_small_in22k": {"epochs": 160},                       # Tab.15
    "vit_base_in22k": {"epochs": 80},                         # Tab.15
    "vit_large_in22k": {"epochs": 50},                        # Tab.15
    "vit_small_no_multicrop": {"local_crops_number": 0, "global_crops_scale": [0.14, 1.0]},  # Tab.10, main_ibot.py:130
    "vit_base_no_multicrop": {"local_crops_number": 0, "global_crops_scale": [0.14, 1.0]},
    "vit_base_rand_mask": {"pred_shape": "rand"},             # README.md:174
    "vit_large_rand_mask": {"pred_shape": "rand"},            # README.md:198
}
#: the Swin-T models of Tab.1 (window size; their pretraining step is tests/test_swin.py's)
SWIN = {"swin_tiny_7": 7, "swin_tiny_14": 14}
#: Embedded-size settings that keep each variant's own keys (crop counts, masks, ...) as resolved.
SHRINK = {"epochs": 1, "batch_size_per_gpu": 4, "global_crops_size": 32, "local_crops_size": 16, "out_dim": 64,
          "patch_out_dim": 64, "head_hidden_dim": 64, "warmup_epochs": 0, "warmup_teacher_temp_epochs": 0,
          "num_workers": 0, "precision": "fp32", "saveckp_freq": 0, "global_batch_size": None, "log_every": 100}


@pytest.fixture(scope="module")
def paper() -> dict[str, Any]:
    return validate_config(load_yaml(ROOT / "config" / "paper.yaml"), base_dir=ROOT)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    sizes = EmbeddedSizes(classes=2, train_per_class=2, val_per_class=1, c_per_class=1, a_classes=2, image_size=32)
    return generate(root, seed=0, sets=["imagenet"], sizes=sizes)["imagenet"] / "train"


def test_variants_resolve_their_recipe_and_data(paper) -> None:
    for model, expected in VARIANTS.items():
        resolved = stage_config(paper, "pretrain", model)
        assert {key: resolved[key] for key in expected} == expected, model
        kind = next(iter(stage_data(paper, "pretrain", model)))  # the registry's data_resolver picks it
        assert kind == ("imagenet22k" if model.endswith("in22k") else "imagenet"), model
    assert stage_data(paper, "pretrain", "vit_base_in22k") == {"imagenet22k": paper["data"]["imagenet22k"]}  # no train/
    assert stage_data(paper, "pretrain", "vit_small") == {"imagenet": f"{paper['data']['imagenet']}/train"}
    assert paper["models"]["vit_base_in22k"]["pretrain_data"] == "IN-22K"
    assert paper["models"]["vit_small_no_multicrop"]["paper_variant"] == "no multi-crop"
    ft512 = paper["models"]["vit_large_in22k_ft512"]
    assert ft512["weights"] == "checkpoint" and planned_stages(paper, "vit_large_in22k_ft512") == ["finetune"]
    assert ft512["weights_from"] == "vit_large_in22k" and ft512["checkpoint"] is None
    assert {k: stage_config(paper, "finetune", "vit_large_in22k_ft512")[k] for k in ("crop", "resize")} == \
        {"crop": 512, "resize": 512}


def test_each_variant_runs_one_embedded_size_pretraining_step(paper, images, tmp_path) -> None:
    """The resolved recipe with only sizes shrunk: one iteration, finite loss, the teacher moves."""
    for model in VARIANTS:
        cfg = {**stage_config(paper, "pretrain", model), **SHRINK, "seed": 0}
        cfg["local_crops_number"] = min(cfg["local_crops_number"], 2)  # 0 stays 0 (the no-multi-crop variant)
        torch.manual_seed(0)
        trainer = Trainer(cfg, {"arch": "vit_tiny", "patch_size": 8, "depth": 2}, str(images), tmp_path / model)
        before = [p.detach().clone() for p in trainer.teacher.parameters()]
        summary = trainer.fit()
        assert summary["epochs"] == 1 and trainer.iters_per_epoch == 1, model
        moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.teacher.parameters()))
        assert moved, f"{model}: the teacher did not move in one step"
        assert len(trainer.dataset[0][0]) == 2 + cfg["local_crops_number"], model


def test_imagenet22k_layout_is_checked_with_its_key(images, tmp_path) -> None:
    check_layout("imagenet22k", images, config_key="data.imagenet22k")  # <wnid>/ folders with images
    with pytest.raises(DatasetLayoutError, match=r"data.imagenet22k.*no class folders"):
        check_layout("imagenet22k", tmp_path, config_key="data.imagenet22k")


def test_checkpoint_weights_need_exactly_one_source() -> None:
    import copy

    config = load_yaml(ROOT / "config" / "paper.yaml")
    no_source = copy.deepcopy(config)
    del no_source["models"]["vit_large_in22k_ft512"]["weights_from"]
    with pytest.raises(ConfigError, match=r"models.vit_large_in22k_ft512: weights: checkpoint needs exactly one"):
        validate_config(no_source, base_dir=ROOT)
    not_pretrained = copy.deepcopy(config)
    not_pretrained["models"]["vit_large_in22k_ft512"]["weights_from"] = "vit_large_in22k_ft384"
    with pytest.raises(ConfigError, match=r"weights_from: 'vit_large_in22k_ft384' is not a model with weights: pretrain"):
        validate_config(not_pretrained, base_dir=ROOT)
    external = copy.deepcopy(config)
    external["models"]["vit_large_in22k_ft512"].update(weights_from=None, checkpoint="/w/checkpoint.pth")
    with pytest.raises(ConfigError, match=r"models.vit_large_in22k_ft512.network: 'student' .* use checkpoint_key"):
        validate_config(external, base_dir=ROOT)


def test_in22k_models_evaluate_the_released_network() -> None:
    """README.md:111, :235, :249: the IN-22K releases are the student backbone; the IN-1K ones the teacher."""
    config = validate_config(load_yaml(ROOT / "config" / "paper.yaml"), base_dir=ROOT)
    networks = {name: entry["network"] for name, entry in config["models"].items()}
    assert {name for name, network in networks.items() if network == "student"} == {
        "vit_base_in22k", "vit_large_in22k", "vit_large_in22k_ft512", "vit_large_in22k_ft384"}


def test_the_paper_dag_plans_every_variant_and_ft512_waits_for_its_pretraining() -> None:
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p",
                             "results/paper/vit_large_in22k_ft512/finetune/metrics.json",
                             "results/paper/vit_base_in22k/knn/metrics.json",
                             "results/paper/vit_small_in22k/knn/metrics.json",
                             *[f"results/paper/{m}/pretrain/teacher_backbone.pth" for m in [*VARIANTS, *SWIN]],
                             "--configfile", "config/paper.yaml"],  # last: --configfile takes several files
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for model in VARIANTS:
        assert f"--out results/paper/{model}/pretrain/metrics.json" in out, model
    assert "--data imagenet22k=/datasets/imagenet22k --out results/paper/vit_large_in22k/pretrain/metrics.json" in out
    # the IN-22K student where it is the released backbone (FT 512 through weights_from), else the teacher
    assert "--checkpoint results/paper/vit_large_in22k/pretrain/student_backbone.pth" in out
    assert "--checkpoint results/paper/vit_base_in22k/pretrain/student_backbone.pth" in out
    assert "--checkpoint results/paper/vit_small_in22k/pretrain/teacher_backbone.pth" in out
    assert "vit_large_in22k/pretrain/teacher_backbone.pth --" not in out
    assert '"crop": 512' in out
    for model, window in SWIN.items():  # the Swin window reaches the pretraining command
        assert f"--patch-size 4 --window-size {window} --run paper --model {model} --seed 0" in out, model
