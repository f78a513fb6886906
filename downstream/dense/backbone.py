"""Our ViT as a dense backbone for mmdet and mmseg (one class, registered in both toolboxes).

``IBOTViTDense`` wraps :func:`ibot.models.vision_transformer.build_backbone` (the backbone every
stage uses) and returns the patch tokens of blocks ``out_indices`` as feature maps, passed through
the paper's multi-scale adaptor (official ``register_backbone.py``, patch 16):

=========  ====================================================================
stride 4   ConvTranspose2d(k2, s2) -> BN (SyncBN when distributed) -> GELU -> ConvTranspose2d(k2, s2)
stride 8   ConvTranspose2d(k2, s2)
stride 16  identity
stride 32  MaxPool2d(2)
=========  ====================================================================

(patch 8: ConvTranspose2d / identity / MaxPool2d(2) / MaxPool2d(4), as the official code.)
Without the adaptor (``with_adaptor=False``, the linear segmentation head) every output is the
stride-``patch_size`` token map.

- Any input size: the input is zero-padded right/bottom to a multiple of the coarsest output
  stride (32 with the adaptor, the patch size without), the positional embeddings are
  interpolated by the backbone's ``prepare_tokens``, and each output is cropped to
  ``ceil(H / stride)`` so that it stays aligned with the unpadded image. (mmdet already pads its
  batches to a multiple of 32; mmseg's sliding window can hand over any crop size.)
- ``final_norm``: apply the backbone's final LayerNorm to the outputs (official: det no, seg yes).
  When it is off, the norm's parameters are frozen (they still load strictly from checkpoints).
- ``frozen``: no gradients and eval mode for the whole ViT (linear segmentation protocol).
- Weights: ``pretrained=<path>`` or ``init_cfg=dict(type='Pretrained', checkpoint=<path>,
  checkpoint_key=None)``; loaded in :meth:`init_weights` through
  :func:`ibot.checkpoint.load_backbone_weights` (strict: a wrong model raises ``CheckpointError``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor, nn

from ibot.checkpoint import load_backbone_weights
from ibot.models.vision_transformer import build_backbone

__all__ = ["IBOTViTDense", "default_out_indices", "register"]

#: Output strides of the adaptor levels (the FPN's input strides).
ADAPTOR_STRIDES = (4, 8, 16, 32)


def default_out_indices(depth: int) -> list[int]:
    """Official block indices scaled to ``depth``: [3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24."""
    return [max(depth // 3 - 1, 0), max(depth // 2 - 1, 0), max(2 * depth // 3 - 1, 0), depth - 1]


def _norm_layer(norm_cfg: dict | None, channels: int) -> nn.Module:
    kind = (norm_cfg or {"type": "BN"}).get("type", "BN")
    if kind in ("SyncBN", "MMSyncBN"):
        return nn.SyncBatchNorm(channels)
    if kind in ("BN", "BN2d"):
        return nn.BatchNorm2d(channels)
    raise ValueError(f"IBOTViTDense: unsupported adaptor norm {kind!r} (use 'BN' or 'SyncBN')")


def _adaptor_level(scale: float, dim: int, norm_cfg: dict | None) -> nn.Module:
    """Resample a stride-p map by ``scale`` (= p / target stride)."""
    if scale == 4:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2), _norm_layer(norm_cfg, dim),
                             nn.GELU(), nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    if scale == 2:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    if scale == 1:
        return nn.Identity()
    if scale in (0.5, 0.25):
        kernel = int(round(1 / scale))
        return nn.MaxPool2d(kernel_size=kernel, stride=kernel)
    raise ValueError(f"IBOTViTDense: no adaptor for a rescale by {scale} (patch size must be 8 or 16)")


class IBOTViTDense(BaseModule):
    """Multi-level features of our ViT for dense heads (see module docstring)."""

    def __init__(self, arch: str = "vit_small", patch_size: int = 16, depth: int | None = None,
                 img_size: int = 224, drop_path_rate: float = 0.0, out_indices: Sequence[int] | None = None,
                 final_norm: bool = False, with_adaptor: bool = True, norm_cfg: dict | None = None,
                 frozen: bool = False, pretrained: str | None = None, checkpoint_key: str | None = None,
                 init_cfg: dict | None = None) -> None:
        init_cfg = dict(init_cfg) if init_cfg else None
        if init_cfg is not None and init_cfg.get("type") == "Pretrained":
            if pretrained is not None:
                raise ValueError("IBOTViTDense: give the weights as `pretrained` or init_cfg, not both")
            pretrained = init_cfg.get("checkpoint")
            checkpoint_key = init_cfg.get("checkpoint_key", checkpoint_key)
            init_cfg = None  # our strict loader, never mmengine's partial PretrainedInit
        super().__init__(init_cfg=init_cfg)
        self.vit = build_backbone(arch, patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate,
                                  masked_im_modeling=False, depth=depth)
        self.arch, self.patch_size, self.embed_dim = arch, patch_size, self.vit.embed_dim
        self.num_layers = self.vit.depth
        self.out_indices = list(out_indices) if out_indices is not None else default_out_indices(self.num_layers)
        if len(self.out_indices) == 0 or not all(0 <= i < self.num_layers for i in self.out_indices):
            raise ValueError(f"IBOTViTDense: out_indices {self.out_indices} out of range for "
                             f"{self.num_layers} blocks")
        self.final_norm, self.with_adaptor, self.frozen = bool(final_norm), bool(with_adaptor), bool(frozen)
        self.pretrained, self.checkpoint_key = pretrained, checkpoint_key
        if self.with_adaptor:
            if len(self.out_indices) != len(ADAPTOR_STRIDES):
                raise ValueError(f"IBOTViTDense: the adaptor needs 4 out_indices, got {self.out_indices}")
            self.adaptor = nn.ModuleList(_adaptor_level(patch_size / s, self.embed_dim, norm_cfg)
                                         for s in ADAPTOR_STRIDES)
            self.out_strides = list(ADAPTOR_STRIDES)
        else:
            self.adaptor = None
            self.out_strides = [patch_size] * len(self.out_indices)
        self.pad_multiple = max([patch_size] + self.out_strides)
        # unused parameters are frozen so that DDP never waits for their gradients
        if not self.final_norm:
            self.vit.norm.requires_grad_(False)
        for block in self.vit.blocks[max(self.out_indices) + 1:]:
            block.requires_grad_(False)
        if self.frozen:
            self.vit.requires_grad_(False)
            self.vit.eval()

    # -- weights -------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Strictly load ``pretrained`` into the ViT (random timm init otherwise); adaptor: torch init."""
        if self.pretrained:
            load_backbone_weights(self.vit, self.pretrained, key=self.checkpoint_key)
        self._is_init = True

    def train(self, mode: bool = True) -> "IBOTViTDense":
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    # -- forward -------------------------------------------------------------------------------
    def _tokens(self, x: Tensor) -> tuple[dict[int, Tensor], int, int]:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.pad_multiple, (-width) % self.pad_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        h_patches, w_patches = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.vit.prepare_tokens(x)
        wanted, last = set(self.out_indices), max(self.out_indices)
        outputs = {}
        for index, block in enumerate(self.vit.blocks):
            tokens = block(tokens)
            if index in wanted:
                outputs[index] = tokens
            if index == last:
                break
        return outputs, h_patches, w_patches

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        batch, _, height, width = x.shape
        if self.frozen:
            with torch.no_grad():
                outputs, h_patches, w_patches = self._tokens(x)
        else:
            outputs, h_patches, w_patches = self._tokens(x)
        prefix = self.vit.num_prefix_tokens
        features = []
        for level, index in enumerate(self.out_indices):
            tokens = outputs[index][:, prefix:]
            if self.final_norm:
                tokens = self.vit.norm(tokens)
            fmap = tokens.transpose(1, 2).reshape(batch, self.embed_dim, h_patches, w_patches).contiguous()
            if self.adaptor is not None:
                fmap = self.adaptor[level](fmap)
            stride = self.out_strides[level]
            fmap = fmap[:, :, :math.ceil(height / stride), :math.ceil(width / stride)]
            features.append(fmap)
        return tuple(features)


def register() -> None:
    """Register ``IBOTViTDense`` in the mmdet and the mmseg MODELS registries (idempotent)."""
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    for registry in (MMDET_MODELS, MMSEG_MODELS):
        if registry.get("IBOTViTDense") is not IBOTViTDense:
            registry.register_module(name="IBOTViTDense", module=IBOTViTDense, force=True)


def build_from_cfg(cfg: dict[str, Any]) -> IBOTViTDense:
    """Build ``cfg`` (without ``type``) — a helper for tests and scripts."""
    return IBOTViTDense(**{k: v for k, v in cfg.items() if k != "type"})
