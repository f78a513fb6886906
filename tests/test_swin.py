"""Swin-T backbone for iBOT: outputs, mask token, mask grid, official checkpoints, a pretraining step, k-NN.

The official model is the spec: its source (models/swin_transformer.py of the bytedance/ibot mirror) is
executed here with the installed timm, so key names, shapes and outputs are compared to the real thing.
"""

from __future__ import annotations

import subprocess
import types
from pathlib import Path

import pytest
import torch

from ibot.checkpoint import CheckpointError, load_backbone_weights
from ibot.data.masking import MaskGenerator
from ibot.models import build_backbone
from ibot.models.swin_transformer import IBOTSwinTransformer

MIRROR = Path("/work/.mirror/bytedance+ibot/repo")
OFFICIAL_COMMIT = "da316d8"
MINI = {"arch": "swin_mini", "patch_size": 4}


@pytest.fixture(scope="module")
def official() -> types.ModuleType:
    """The official models/swin_transformer.py, executed (its timm imports mapped to timm 1.x names)."""
    try:
        source = subprocess.run(["git", "-C", str(MIRROR), "show", f"{OFFICIAL_COMMIT}:models/swin_transformer.py"],
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"official iBOT mirror not available at {MIRROR}: {error}")
    source = (source.replace("from timm.models.layers import", "from timm.layers import")
              .replace("from timm.models.registry import register_model", "register_model = lambda f: f"))
    module = types.ModuleType("official_swin")
    exec(compile(source, "official/models/swin_transformer.py", "exec"), module.__dict__)
    return module


def _official_swin_tiny(official, window_size: int, masked: bool) -> torch.nn.Module:
    torch.manual_seed(3)
    model = official.swin_tiny(window_size=window_size, num_classes=0, drop_path_rate=0.0,
                               return_all_tokens=True, masked_im_modeling=masked)
    with torch.no_grad():  # non-trivial mask token and norms, so a wrong mapping cannot hide
        for name, param in model.named_parameters():
            if name == "masked_embed" or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


# -- architecture ------------------------------------------------------------------------------------
def test_shapes_and_mask_token_effect():
    torch.manual_seed(0)
    model = build_backbone("swin_mini", patch_size=4, img_size=64)
    assert isinstance(model, IBOTSwinTransformer) and model.embed_dim == 384 and model.mask_patch_size == 32
    images = torch.randn(3, 3, 64, 64)
    tokens = model(images)
    assert tokens.shape == (3, 1 + 2 * 2, 384)  # [avg, 2x2 final-stage tokens]
    assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(1), atol=1e-5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2, 384)  # local crop: 1x1 final grid
    none = torch.zeros(3, 2, 2, dtype=torch.bool)
    assert torch.equal(model(images, none), tokens)
    with torch.no_grad():
        model.masked_embed.normal_()
    mask = none.clone()
    mask[0, 0, 1] = True
    masked = model(images, mask)
    assert not torch.allclose(masked[0], tokens[0]) and torch.allclose(masked[1:], tokens[1:], atol=1e-6)
    masked.sum().backward()
    assert model.masked_embed.grad is not None and model.masked_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not tile"):
        model(images, torch.zeros(3, 3, 3, dtype=torch.bool))


def test_builder_rejects_vit_options_and_wrong_patch():
    with pytest.raises(ValueError, match="patch_size: 16"):
        build_backbone("swin_tiny")  # the schema's ViT default would build a 16-px Swin
    with pytest.raises(ValueError, match="ViT-only"):
        build_backbone("swin_mini", patch_size=4, depth=2)
    with pytest.raises(ValueError, match="Swin only"):
        build_backbone("vit_tiny", patch_size=16, window_size=7)
    model = build_backbone("swin_mini", patch_size=4, img_size=64, masked_im_modeling=False)
    assert model.block_dims == (48, 96, 192, 192, 384)  # depths 1-1-2-1, width doubling per stage
    assert model.linear_feature_dim(4, 0) == 96 + 192 + 192 + 384
    with pytest.raises(ValueError, match="ViT-only"):
        model.linear_feature_dim(1, 2)
    with pytest.raises(ValueError, match="n_last_blocks"):
        model.linear_feature_dim(6, 0)


def test_mask_grid_is_the_final_stage_grid():
    """main_ibot.py:167: masks for Swin use pred_size = patch_size * 8 (one final-stage token)."""
    model = build_backbone("swin_tiny", patch_size=4, masked_im_modeling=True)
    generator = MaskGenerator(model.mask_patch_size, 0.3, 0.0, (0.3, 1 / 0.3), "block", 0)
    import numpy as np
    mask = generator.mask_for_crop(224, 224, np.random.default_rng(0))
    assert tuple(mask.shape) == (7, 7) and mask.any()
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1 + 49, 768)


# -- official model and checkpoints ----------------------------------------------------------------------
@pytest.mark.parametrize("window_size", [7, 14])
def test_official_checkpoint_layouts_load_with_identical_outputs(official, tmp_path, window_size):
    """Official Swin-T/7 and /14 state dicts (teacher file, training checkpoint) → timm model: no missing or
    unexpected keys; same tokens (224 px with a mask; 96 px, where the window does not tile the grid) and
    same intermediate layers (the linear-probe features)."""
    reference = _official_swin_tiny(official, window_size, masked=True)
    state = reference.state_dict()
    assert "layers.0.downsample.reduction.weight" in state and any("relative_position_index" in k for k in state)
    teacher_state = {k: v for k, v in state.items() if k != "masked_embed"}
    torch.save({"state_dict": teacher_state}, tmp_path / "checkpoint_teacher.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher_state.items()},
                "student": {f"module.backbone.{k}": v for k, v in state.items()}, "epoch": 300},
               tmp_path / "checkpoint.pth")

    ours = build_backbone("swin_tiny", patch_size=4, window_size=window_size, masked_im_modeling=True).eval()
    tolerated = load_backbone_weights(ours, tmp_path / "checkpoint.pth", key="student")
    assert tolerated["missing_optional"] == []
    teacher = build_backbone("swin_tiny", patch_size=4, window_size=window_size, masked_im_modeling=False).eval()
    assert load_backbone_weights(teacher, tmp_path / "checkpoint_teacher.pth")["missing_optional"] == []

    torch.manual_seed(1)
    images, small = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 96, 96)  # global crop, padded local crop
    mask = torch.rand(1, 7, 7) < 0.4
    with torch.no_grad():
        assert torch.allclose(ours(images, mask), reference(images, mask=mask.clone()), atol=1e-4)
        assert torch.allclose(teacher(small), reference(small), atol=1e-4)
        for a, b in zip(ours.get_intermediate_layers(images, 4), reference.get_intermediate_layers(images, 4)):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)

    if window_size == 14:  # a Swin-T/14 checkpoint in a window-7 model is refused, not resampled
        with pytest.raises(CheckpointError, match="another Swin window"):
            load_backbone_weights(build_backbone("swin_tiny", patch_size=4, masked_im_modeling=False),
                                  tmp_path / "checkpoint_teacher.pth")


def test_official_linear_feature_size(official):
    """eval_linear.py:99-103 with run.sh's LINEAR_N_LAST_BLOCKS=4 for swin: 384*2 + 768*2."""
    from downstream.engine.features import backbone_feature_dim, linear_features
    model = build_backbone("swin_tiny", patch_size=4, masked_im_modeling=False).eval()
    assert backbone_feature_dim(model, 4, 0) == 2304
    with torch.no_grad():
        assert linear_features(model, torch.randn(1, 3, 224, 224), 4, 0).shape == (1, 2304)
    with pytest.raises(ValueError, match="ViT-only"):
        backbone_feature_dim(model, 4, 2)


# -- pretraining and k-NN on the embedded size -------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    from ibot.data.embedded import EmbeddedSizes, generate
    root = tmp_path_factory.mktemp("data")
    sizes = EmbeddedSizes(classes=3, train_per_class=8, val_per_class=2, c_per_class=2, a_classes=2, image_size=64)
    return str(generate(root, seed=0, sets=["imagenet"], sizes=sizes)["imagenet"] / "train")


def test_pretraining_step_and_knn_features(images, tmp_path):
    from downstream.engine.features import cls_features
    from downstream.engine.setup import build_eval_backbone
    from helpers import run_pretrain
    from ibot.checkpoint import BackboneCheckpoint, load_file
    from ibot.stages import stage_defaults
    from ibot.train.pretrain import Trainer

    cfg = {**stage_defaults("pretrain"), "epochs": 1, "batch_size_per_gpu": 8, "global_crops_size": 64, "local_crops_size": 32,
           "local_crops_number": 2, "num_workers": 0, "out_dim": 128, "patch_out_dim": 128, "head_hidden_dim": 128,
           "warmup_epochs": 0, "warmup_teacher_temp_epochs": 0, "pred_ratio": [0.0, 0.3],
           "pred_ratio_var": [0.0, 0.2], "saveckp_freq": 0, "precision": "fp32", "momentum_teacher": 0.9}
    trainer = Trainer(cfg, MINI, images, tmp_path / "t")
    crops, _, masks = next(iter(trainer._loader(0)))
    assert tuple(masks[0].shape[-2:]) == (2, 2)  # 64 px global crop / 32 px mask cells
    assert crops[0].shape[-1] == 64 and crops[-1].shape[-1] == 32
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    stats = trainer.train_step(crops, masks, 0, 0)
    assert all(torch.isfinite(torch.tensor(float(v))) for v in stats.values() if isinstance(v, (int, float)))
    student, teacher = trainer.student.state_dict(), trainer.teacher.state_dict()
    name = "backbone.layers.2.blocks.1.attn.qkv.weight"
    assert not torch.equal(student[name], student_before[name])
    # EMA: teacher = m * teacher + (1 - m) * student, with the step's momentum
    m = float(trainer.momentum_schedule[0])
    assert torch.allclose(teacher[name], m * teacher_before[name] + (1 - m) * student[name], atol=1e-6)
    assert "backbone.masked_embed" in student and "backbone.masked_embed" not in teacher

    out = tmp_path / "pretrain"
    run_pretrain(images, out, cfg, MINI)
    exported = load_file(out / "teacher_backbone.pth")
    assert exported["meta"]["arch"] == "swin_mini"
    backbone = build_eval_backbone(MINI, BackboneCheckpoint(out / "teacher_backbone.pth"), 64)
    assert torch.equal(backbone.state_dict()[name.removeprefix("backbone.")],
                       exported["state_dict"][name.removeprefix("backbone.")])
    features = cls_features(backbone, torch.randn(4, 3, 64, 64))
    assert features.shape == (4, 384) and torch.isfinite(features).all()


def test_model_spec_carries_window_size_for_swin_only():
    """``models.<name>.window_size`` reaches the builders; ViT specs stay as before (same fingerprints)."""
    from ibot.config import model_spec
    config = {"models": {"swin_tiny_14": {"arch": "swin_tiny", "patch_size": 4, "window_size": 14},
                         "vit": {"arch": "vit_small", "patch_size": 16}}}
    assert model_spec(config, "swin_tiny_14").as_dict() == {"arch": "swin_tiny", "patch_size": 4, "depth": None,
                                                            "window_size": 14}
    assert model_spec(config, "vit").as_dict() == {"arch": "vit_small", "patch_size": 16, "depth": None}
    assert model_spec(config, "swin_tiny_14").cli_args()[-2:] == ["--window-size", "14"]
    from ibot.models.pretrained import build_pretrained_backbone
    backbone = build_pretrained_backbone(model_spec(config, "swin_tiny_14"), None)
    assert backbone.window_size == 14 and backbone.layers[0].blocks[1].shift_size == (7, 7)
