"""Build a backbone from a model spec and (optionally) pretrained weights — the one entry point
every downstream stage uses, for our exports and for external (official iBOT/DINO) checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ibot.checkpoint import load_backbone_weights
from ibot.models.vision_transformer import IBOTVisionTransformer, build_backbone

__all__ = ["build_pretrained_backbone", "MODEL_SPEC_KEYS"]

#: Keys of a model spec (``models.<name>`` in the config) that define the backbone.
MODEL_SPEC_KEYS = ("arch", "patch_size", "depth", "window_size")


def build_pretrained_backbone(spec: Mapping[str, Any], checkpoint: str | Path | None, *,
                              checkpoint_key: str | None = None, img_size: int = 224,
                              drop_path_rate: float = 0.0) -> IBOTVisionTransformer:
    """Backbone for evaluation: no mask token, strict weight loading; random init if no checkpoint."""
    backbone = build_backbone(spec["arch"], patch_size=int(spec.get("patch_size", 16)), img_size=img_size,
                              drop_path_rate=drop_path_rate, masked_im_modeling=False, depth=spec.get("depth"),
                              window_size=spec.get("window_size"))
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint, key=checkpoint_key)
    return backbone
