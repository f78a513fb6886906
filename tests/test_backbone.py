"""The shared ViT backbone and the one checkpoint loader (official formats, strict loads)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from ibot.checkpoint import CheckpointError, export_backbone, load_backbone_weights, save_atomic
from ibot.models import build_backbone
from ibot.models.pretrained import build_pretrained_backbone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2).eval()
    torch.nn.init.normal_(backbone.masked_embed)
    torch.nn.init.normal_(backbone.pos_embed)
    return backbone


def test_pos_embed_interpolation_matches_official_formula(model):
    assert model.interpolate_pos_encoding(4, 4) is model.pos_embed
    table = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    reference = F.interpolate(table, scale_factor=(6.1 / 4, 3.1 / 4), mode="bicubic")
    reference = reference.permute(0, 2, 3, 1).reshape(1, 18, -1)
    resized = model.interpolate_pos_encoding(6, 3)
    assert torch.allclose(resized[:, 0], model.pos_embed[:, 0])
    assert torch.allclose(resized[:, 1:], reference)
    assert model(torch.randn(2, 3, 48, 24)).shape == (2, 1 + 18, 192)


def test_mask_token_replaces_patch_embeddings_before_positions(model):
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 3, 0] = True
    tokens = model.prepare_tokens(x, mask)
    patches = model.patch_embed(x).reshape(2, 16, -1)
    expected = torch.where(mask.reshape(2, 16, 1), model.masked_embed, patches)
    expected = torch.cat((model.cls_token.expand(2, -1, -1), expected), 1) + model.pos_embed
    assert torch.allclose(tokens, expected)
    assert torch.allclose(tokens[0, 1 + 6], model.masked_embed[0] + model.pos_embed[0, 1 + 6])


def test_intermediate_layers_and_attention(model):
    x = torch.randn(2, 3, 32, 32)
    last = model.get_intermediate_layers(x, 1)[0]
    assert torch.allclose(last, model(x), atol=1e-6)
    assert len(model.get_intermediate_layers(x, [0, 1])) == 2
    attention = model.get_last_selfattention(x)
    assert attention.shape == (2, 3, 17, 17)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 3, 17), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, [5])


def test_uses_timm_fused_attention(model):
    assert all(block.attn.fused_attn for block in model.blocks)


def _official_backbone_state(model) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "masked_embed"}
    return state


@pytest.mark.parametrize("layout", ["training", "teacher_export", "dino_plain", "ours"])
def test_loader_accepts_official_layouts(tmp_path, model, layout):
    source = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, masked_im_modeling=False)
    backbone = _official_backbone_state(source)
    path = tmp_path / "ckpt.pth"
    if layout == "training":  # official main_ibot.py checkpoint.pth (argparse args pickled)
        head = {"head.mlp.0.weight": torch.randn(4, 192), "head.last_layer.weight_g": torch.ones(8, 1)}
        torch.save({"student": {f"module.backbone.{k}": v + 1 for k, v in backbone.items()} | {
            f"module.{k}": v for k, v in head.items()},
            "teacher": {f"backbone.{k}": v for k, v in backbone.items()} | head,
            "epoch": 3, "args": argparse.Namespace(arch="vit_tiny"), "ibot_loss": {}}, path)
    elif layout == "teacher_export":
        torch.save({"state_dict": backbone}, path)
    elif layout == "dino_plain":
        torch.save(backbone, path)
    else:
        export_backbone(source, path, {"arch": "vit_tiny"})
    loaded = build_pretrained_backbone({"arch": "vit_tiny", "patch_size": 8, "depth": 2}, path, img_size=32)
    for key, value in backbone.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_loader_refuses_partial_or_foreign_checkpoints(tmp_path):
    small = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2)
    other = build_backbone("vit_small", patch_size=8, img_size=32, depth=3)
    path = tmp_path / "other.pth"
    save_atomic({"state_dict": other.state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(small, path)
    message = str(info.value)
    assert "unexpected keys" in message and "blocks.2" in message and "shape mismatches" in message

    truncated = tmp_path / "truncated.pth"
    data = (tmp_path / "other.pth").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_backbone_weights(small, truncated)

    nothing = tmp_path / "nothing.pth"
    torch.save({"epoch": 1, "note": "no weights"}, nothing)
    with pytest.raises(CheckpointError, match="state dict"):
        load_backbone_weights(small, nothing)


def test_checkpoint_at_another_resolution_is_resampled(tmp_path):
    source = build_backbone("vit_tiny", patch_size=8, img_size=64, depth=2)
    path = tmp_path / "hi.pth"
    export_backbone(source, path, {})
    target = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2)
    load_backbone_weights(target, path)
    assert target.pos_embed.shape[1] == 1 + 16
    assert math.isfinite(target.pos_embed.sum().item())
