"""Frozen-backbone features: extraction over a whole dataset (gathered across processes, in dataset
order), the k-NN feature (final-norm [CLS]), the linear-probe feature (the [CLS] tokens of the last
blocks, optionally with the patch-token mean) and the part-wise feature (the mean of the patch tokens
the [CLS] token attends to most)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from downstream.engine.setup import autocast, progress
from ibot.distributed import all_gather_cat

__all__ = ["extract_features", "cls_features", "avgpool_mode", "feature_dim", "backbone_feature_dim",
           "linear_features", "partwise_features"]


def cls_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """The k-NN feature: final-norm [CLS] token, [B, D]."""
    return backbone(images)[:, 0]


@torch.no_grad()
def extract_features(feature_fn: Callable[[Tensor], Tensor], loader: DataLoader, num_samples: int, *,
                     device: torch.device, precision: str = "fp32", desc: str = "features",
                     out_device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Features and labels of every sample of ``loader.dataset``, in dataset order, on every rank.

    Each rank runs ``feature_fn`` on its shard; per batch, features, labels and sample indices are
    gathered (``all_gather_cat``) and written at their index, so the duplicates a padding
    ``DistributedSampler`` adds overwrite identical rows. Features are returned in float32.
    """
    features: Tensor | None = None
    labels = torch.full((num_samples,), -1, dtype=torch.long, device=out_device)
    for images, targets, index in progress(loader, desc=desc):
        images = images.to(device, non_blocking=True)
        with autocast(precision, device):
            feats = feature_fn(images)
        feats = all_gather_cat(feats.float().contiguous())
        targets = all_gather_cat(targets.to(device))
        index = all_gather_cat(index.to(device))
        if features is None:
            features = torch.zeros(num_samples, feats.shape[-1], dtype=torch.float32, device=out_device)
        index = index.to(out_device)
        features.index_copy_(0, index, feats.to(out_device))
        labels.index_copy_(0, index, targets.to(out_device))
    if features is None or bool((labels < 0).any()):
        raise RuntimeError(f"{desc}: feature extraction missed samples ({int((labels < 0).sum())} of {num_samples})")
    return features, labels


def avgpool_mode(avgpool_patchtokens: bool | int) -> int:
    """Official ``--avgpool_patchtokens`` code: 0 [CLS] only, 1 patch mean only, 2 [CLS] ⊕ patch mean.

    ``True`` means 2 (concatenate the patch-token average to the [CLS] tokens), ``False`` means 0.
    """
    if isinstance(avgpool_patchtokens, bool):
        return 2 if avgpool_patchtokens else 0
    if avgpool_patchtokens not in (0, 1, 2):
        raise ValueError(f"avgpool_patchtokens: {avgpool_patchtokens!r}; expected a bool or 0/1/2")
    return int(avgpool_patchtokens)


def feature_dim(embed_dim: int, n_last_blocks: int, avgpool_patchtokens: bool | int) -> int:
    mode = avgpool_mode(avgpool_patchtokens)
    return embed_dim * (n_last_blocks * int(mode != 1) + int(mode > 0))


def backbone_feature_dim(backbone: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool | int) -> int:
    """Feature size for ``backbone``: ViT ``embed_dim`` × blocks (+ patch mean); Swin the sum of its last
    blocks' widths (eval_linear.py:99-103; ``IBOTSwinTransformer.linear_feature_dim`` rejects the
    ViT-only ``avgpool_patchtokens``)."""
    if hasattr(backbone, "linear_feature_dim"):
        return int(backbone.linear_feature_dim(int(n_last_blocks), avgpool_mode(avgpool_patchtokens)))
    if not 1 <= n_last_blocks <= len(backbone.blocks):
        raise ValueError(f"linear.n_last_blocks: {n_last_blocks} but the backbone has {len(backbone.blocks)} blocks")
    return feature_dim(backbone.embed_dim, n_last_blocks, avgpool_patchtokens)


def linear_features(backbone: nn.Module, images: Tensor, n_last_blocks: int,
                    avgpool_patchtokens: bool | int) -> Tensor:
    """Linear-probe features [B, F]: [CLS] of the last ``n_last_blocks`` blocks (each after the final
    norm), optionally ⊕ the mean of the last block's normed patch tokens (official eval_linear.py)."""
    mode = avgpool_mode(avgpool_patchtokens)
    outputs = backbone.get_intermediate_layers(images, int(n_last_blocks))
    parts = [] if mode == 1 else [x[:, 0] for x in outputs]
    if mode > 0:
        parts.append(outputs[-1][:, 1:].mean(dim=1))
    return torch.cat(parts, dim=-1)


def partwise_features(backbone: nn.Module, images: Tensor, topk: Sequence[int], *, final_norm: bool = False,
                      reverse: bool = False) -> Tensor:
    """Part-wise linear-probe features [len(topk), B, D] (official analysis/linear_part/eval.py:249-255): the
    last block's [CLS]-to-patch attention averaged over heads ranks the patches; for each k the mean of the
    k top-ranked patch tokens (bottom-ranked if ``reverse``, the official ``--reverse_top``).

    The official model is built with ``use_mean_pooling=True`` (eval.py:118-121), which makes its final norm
    an identity (models/vision_transformer.py:160): the tokens are the last block's output without the final
    LayerNorm, ``final_norm=False`` here; ``True`` applies the backbone's final norm.
    """
    if not hasattr(backbone, "get_last_tokens_and_selfattention"):
        raise ValueError(f"part-wise linear probing reads ViT patch tokens; {type(backbone).__name__} has none")
    tokens, attention = backbone.get_last_tokens_and_selfattention(images, norm=final_norm)
    patches = tokens[:, 1:]
    if max(topk) > patches.shape[1]:
        raise ValueError(f"linear_part.topk: {max(topk)} patches asked, the backbone gives {patches.shape[1]}")
    scores = attention[:, :, 0, 1:].mean(dim=1) * (-1.0 if reverse else 1.0)  # [B, N]
    order = scores.topk(max(topk), dim=-1).indices  # [B, max k], most attended first
    ranked = torch.gather(patches, 1, order.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return torch.stack([ranked[:, :k].mean(dim=1) for k in topk])
