"""Layer-wise learning-rate decay of a ViT: the one definition of a parameter's layer id.

The official BEiT/iBOT rule (``get_num_layer_for_vit``, bytedance/ibot
``evaluation/classification_layer_decay/optim_factory.py:32-43`` for fine-tuning and, on
``backbone.``-prefixed names, ``evaluation/object_detection/mmcv_custom/layer_decay_optimizer_constructor.py:17-26``
for the dense stages):

- the token embeddings (``cls_token``, ``pos_embed``, the mask token, ``patch_embed.*``) are layer 0;
- ``blocks.i`` is layer ``i + 1``;
- everything else (the final norm, classification/segmentation/detection heads, necks, adaptors) is
  the top layer ``depth + 1``;

and a parameter of layer ``l`` trains at ``lr * decay ** (depth + 1 - l)``
(``optim_factory.py`` via ``LayerDecayValueAssigner``; ``layer_decay_optimizer_constructor.py:65``).

Fine-tuning (timm's optimizer factory, fed through ``ViTClassifier.group_matcher``) and the dense
stages (the mmengine optimizer constructor) both call :func:`vit_layer_id`.
"""

from __future__ import annotations

__all__ = ["EMBEDDING_NAMES", "vit_layer_id", "layer_scale"]

#: Parameters of the token embedding (layer 0) besides ``patch_embed.*``. ``mask_token`` is the official
#: name, ``masked_embed`` ours (iBOT's MIM token, unused after pretraining); ``reg_token`` for ViTs with
#: register tokens.
EMBEDDING_NAMES = frozenset({"cls_token", "pos_embed", "mask_token", "masked_embed", "reg_token"})


def vit_layer_id(name: str, depth: int, prefix: str = "") -> int:
    """Layer id (0 .. ``depth + 1``) of parameter ``name`` of a model whose ViT parameters are named
    ``prefix + <ViT parameter name>`` (``"backbone."`` in fine-tuning, ``"backbone.vit."`` in the dense
    models). Parameters outside ``prefix`` (heads, necks) are on the top layer ``depth + 1``."""
    if not name.startswith(prefix):
        return depth + 1
    local = name[len(prefix):]
    if local in EMBEDDING_NAMES or local.startswith("patch_embed"):
        return 0
    if local.startswith("blocks."):
        block = int(local.split(".")[1])
        if not 0 <= block < depth:
            raise ValueError(f"parameter {name!r}: block {block} outside a ViT of depth {depth}")
        return block + 1
    return depth + 1


def layer_scale(layer_id: int, depth: int, decay: float) -> float:
    """lr multiplier of layer ``layer_id``: ``decay ** (depth + 1 - layer_id)`` (1 for the top layer)."""
    if not 0 <= layer_id <= depth + 1:
        raise ValueError(f"layer id {layer_id} outside 0..{depth + 1}")
    return float(decay) ** (depth + 1 - layer_id)
