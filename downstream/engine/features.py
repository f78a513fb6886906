"""Frozen-backbone features: extraction over a whole dataset (gathered across processes, in dataset
order), the k-NN feature (final-norm [CLS]) and the linear-probe feature (the [CLS] tokens of the last
blocks, optionally with the patch-token mean)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from downstream.engine.setup import autocast, progress
from ibot.distributed import all_gather_cat

__all__ = ["extract_features", "cls_features", "avgpool_mode", "feature_dim", "backbone_feature_dim",
           "linear_features"]


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
