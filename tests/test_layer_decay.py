"""Layer-wise lr decay: one rule (``ibot.models.layer_decay``) equal to both official functions, and the
fine-tuning (timm) and dense (mmengine) optimizers giving every ViT parameter the same lr scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from downstream.engine import finetune
from downstream.dense.backbone import IBOTViTDense
from ibot.stages import stage_defaults
from ibot.models.layer_decay import layer_scale, vit_layer_id
from ibot.models.vision_transformer import build_backbone

DEPTH = 3


def official_finetune_layer_id(var_name: str, num_max_layer: int) -> int:
    """bytedance/ibot evaluation/classification_layer_decay/optim_factory.py:32-43, transcribed."""
    if var_name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    elif var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("blocks"):
        layer_id = int(var_name.split('.')[1])
        return layer_id + 1
    else:
        return num_max_layer - 1


def _official_dense_layer_id(var_name: str, num_max_layer: int) -> int:
    """bytedance/ibot evaluation/object_detection/mmcv_custom/layer_decay_optimizer_constructor.py:17-26."""
    if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    elif var_name.startswith("backbone.patch_embed"):
        return 0
    elif var_name.startswith("backbone.blocks"):
        layer_id = int(var_name.split('.')[2])
        return layer_id + 1
    else:
        return num_max_layer - 1


def _vit_names() -> list[str]:
    """Every parameter name of our ViT (MIM token included) plus the official mask token's name."""
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=DEPTH, masked_im_modeling=True)
    return [name for name, _ in vit.named_parameters()] + ["mask_token"]


def test_layer_id_is_the_official_rule_for_every_vit_parameter() -> None:
    # fine-tuning: num_layers = model.get_num_layers() = depth; the assigner holds depth + 2 values
    # (run_class_finetuning.py:546-552), i.e. num_max_layer = depth + 2
    # dense: num_layers = paramwise_cfg num_layers (the depth) + 2 (layer_decay_optimizer_constructor.py:46)
    names = _vit_names()
    official_ids = set()
    for name in names:
        local = "mask_token" if name == "masked_embed" else name  # official name of our MIM token
        official = official_finetune_layer_id(local, DEPTH + 2)
        assert vit_layer_id(name, DEPTH) == official, name
        assert vit_layer_id(f"backbone.{name}", DEPTH, prefix="backbone.") == \
            _official_dense_layer_id(f"backbone.{local}", DEPTH + 2), name
        assert vit_layer_id(f"backbone.vit.{name}", DEPTH, prefix="backbone.vit.") == official, name
        official_ids.add(official)
    assert official_ids == set(range(DEPTH + 2))
    for head in ("head.weight", "neck.conv.weight", "decode_head.conv_seg.bias", "backbone.adaptor.0.weight"):
        assert vit_layer_id(head, DEPTH, prefix="backbone.vit.") == DEPTH + 1
    # official scales: decay ** (num_layers + 1 - i) (run_class_finetuning.py:552) and
    # decay ** (num_layers + 2 - layer_id - 1) (layer_decay_optimizer_constructor.py:46,65)
    for layer in range(DEPTH + 2):
        assert layer_scale(layer, DEPTH, 0.65) == pytest.approx(0.65 ** (DEPTH + 1 - layer))
    with pytest.raises(ValueError, match="outside"):
        vit_layer_id("blocks.3.mlp.fc1.weight", DEPTH)


class _Detector(nn.Module):
    """A dense model: the ViT under ``backbone.vit.``, an adaptor, and a neck."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = IBOTViTDense(arch="vit_tiny", patch_size=8, depth=DEPTH, final_norm=True)
        self.neck = nn.Conv2d(192, 8, 1)


@pytest.mark.parametrize("decay", [0.65, 0.8])
def test_finetune_and_dense_optimizers_give_each_vit_parameter_the_same_lr_scale(decay: float) -> None:
    import downstream.dense.registry  # noqa: F401  (registers the constructor)
    from mmengine.optim import build_optim_wrapper

    torch.manual_seed(0)
    classifier = finetune.ViTClassifier(
        build_backbone("vit_tiny", patch_size=8, img_size=32, depth=DEPTH, masked_im_modeling=False), 5)
    timm_opt = finetune.build_optimizer(classifier, {**stage_defaults("finetune"), "layer_decay": decay})
    timm_scale = {id(p): g["lr_scale"] for g in timm_opt.param_groups for p in g["params"]}
    finetune_scales = {name.removeprefix("backbone."): timm_scale[id(p)]
                       for name, p in classifier.named_parameters() if name.startswith("backbone.")}

    detector = _Detector()
    wrapper = build_optim_wrapper(detector, dict(
        optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
        constructor="IBOTLayerDecayOptimWrapperConstructor", paramwise_cfg=dict(layer_decay_rate=decay)))
    dense_scale = {id(p): g["lr_scale"] for g in wrapper.optimizer.param_groups for p in g["params"]}
    dense_scales = {name.removeprefix("backbone.vit."): dense_scale[id(p)]
                    for name, p in detector.named_parameters() if name.startswith("backbone.vit.") and p.requires_grad}

    assert set(finetune_scales) == set(dense_scales) and len(finetune_scales) > 4 * DEPTH
    for name, scale in finetune_scales.items():
        expected = layer_scale(vit_layer_id(name, DEPTH), DEPTH, decay)
        assert scale == pytest.approx(expected), name
        assert dense_scales[name] == pytest.approx(expected), name
    # heads and necks of both train at the full lr
    assert timm_scale[id(classifier.head.weight)] == 1.0 and dense_scale[id(detector.neck.weight)] == 1.0
