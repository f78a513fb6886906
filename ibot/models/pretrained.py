"""Build a backbone from a model spec and (optionally) pretrained weights — the one entry point
every downstream stage uses, for our exports and for external (official iBOT/DINO) checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ibot.checkpoint import BackboneCheckpoint, load_backbone_weights
from ibot.models.specs import ModelSpec
from ibot.models.vision_transformer import IBOTVisionTransformer, build_backbone

__all__ = ["build_pretrained_backbone"]


def build_pretrained_backbone(spec: ModelSpec | Mapping[str, Any], checkpoint: BackboneCheckpoint | str | Path | None,
                              *, checkpoint_key: str | None = None, img_size: int = 224,
                              drop_path_rate: float = 0.0) -> IBOTVisionTransformer:
    """Backbone for evaluation: no mask token, strict weight loading; random init if no checkpoint."""
    spec = ModelSpec.of(spec)
    backbone = build_backbone(spec.arch, patch_size=spec.patch_size, img_size=img_size, drop_path_rate=drop_path_rate,
                              masked_im_modeling=False, depth=spec.depth, window_size=spec.window_size)
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint, key=checkpoint_key)
    return backbone
