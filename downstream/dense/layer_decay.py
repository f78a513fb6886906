"""Layer-wise learning-rate decay for the dense stages (official iBOT/BEiT rule, mmengine 0.10 API).

Layer ids over the *whole* detector/segmentor come from :func:`ibot.models.layer_decay.vit_layer_id`
(the rule fine-tuning uses too) on the ViT's parameters under ``backbone.vit.``: embeddings → 0,
``blocks.i`` → i + 1, everything else (the ViT's final norm, the adaptor, necks, heads) → ``depth + 1``;
lr ``base_lr * decay^(depth + 1 - layer_id)``. No weight decay for 1-D parameters, biases and the
token embeddings (``pos_embed``, ``cls_token``, mask/register tokens).

(The official constructor meant to exempt pos_embed/cls_token too, but compared the unprefixed
names against ``backbone.``-prefixed ones, so they were decayed there; we exempt them, like the
ImageNet fine-tuning recipe does.)
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS
from torch import nn

from ibot.models.layer_decay import EMBEDDING_NAMES, layer_scale, vit_layer_id

__all__ = ["IBOTLayerDecayOptimWrapperConstructor", "layer_decay_param_groups"]


def _no_weight_decay(name: str, param: nn.Parameter, prefix: str) -> bool:
    local = name[len(prefix):] if name.startswith(prefix) else name
    return param.ndim == 1 or name.endswith(".bias") or local in EMBEDDING_NAMES


def layer_decay_param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], *, base_lr: float,
                             weight_decay: float, decay_rate: float, num_layers: int,
                             prefix: str = "backbone.vit.") -> list[dict[str, Any]]:
    """Optimizer param groups (one per layer id × decay/no-decay), each with its lr and ``lr_scale``.

    ``num_layers`` is the ViT depth; the ViT's parameters are named ``prefix + <ViT parameter name>``.
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        no_decay = _no_weight_decay(name, param, prefix)
        lid = vit_layer_id(name, num_layers, prefix)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            scale = layer_scale(lid, num_layers, decay_rate)
            groups[key] = {"params": [], "param_names": [], "lr": base_lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay, "group_name": key,
                           "layer_id": lid}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    # highest layer (the heads, lr scale 1) first: mmengine logs the lr of the first group
    return sorted(groups.values(), key=lambda g: (-g["layer_id"], g["group_name"]))


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(force=True)
class IBOTLayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``optim_wrapper=dict(constructor='IBOTLayerDecayOptimWrapperConstructor', optimizer=...,
    paramwise_cfg=dict(layer_decay_rate=0.75, num_layers=None, backbone_prefix='backbone.vit.'))``.

    ``num_layers`` defaults to ``model.backbone.num_layers`` (the ViT depth).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        paramwise_cfg = dict(paramwise_cfg or {})
        self.layer_decay_rate = float(paramwise_cfg.pop("layer_decay_rate", 1.0))
        self.num_layers = paramwise_cfg.pop("num_layers", None)
        self.backbone_prefix = paramwise_cfg.pop("backbone_prefix", "backbone.vit.")
        if paramwise_cfg:
            raise ValueError(f"IBOTLayerDecayOptimWrapperConstructor: unsupported paramwise_cfg keys "
                             f"{sorted(paramwise_cfg)}")
        super().__init__(optim_wrapper_cfg, None)

    def __call__(self, model: nn.Module):
        if hasattr(model, "module"):
            model = model.module
        num_layers = self.num_layers
        if num_layers is None:
            num_layers = getattr(getattr(model, "backbone", None), "num_layers", None)
            if num_layers is None:
                raise ValueError("IBOTLayerDecayOptimWrapperConstructor: set paramwise_cfg.num_layers "
                                 "(model.backbone has no num_layers)")
        groups = layer_decay_param_groups(
            model.named_parameters(), base_lr=self.base_lr, weight_decay=self.base_wd,
            decay_rate=self.layer_decay_rate, num_layers=int(num_layers), prefix=self.backbone_prefix)
        summary = {g["group_name"]: {"lr_scale": round(g["lr_scale"], 6), "weight_decay": g["weight_decay"],
                                     "num_params": len(g["params"])} for g in groups}
        print_log(f"layer decay {self.layer_decay_rate} over {num_layers} blocks: "
                  f"{json.dumps(summary)}", logger="current", level=logging.INFO)
        optimizer_cfg = self.optimizer_cfg.copy()
        optimizer_cfg["params"] = groups
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = self.optim_wrapper_cfg.copy()
        wrapper_cfg.setdefault("type", "OptimWrapper")
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))
