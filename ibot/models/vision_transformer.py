"""The one ViT backbone used by every stage: timm's VisionTransformer plus iBOT's mask token.

timm provides the blocks (fused SDPA attention, drop path, LayerNorm eps 1e-6). What iBOT adds:
- a learnable mask token (``masked_embed``, [1, D], zero-init) that replaces masked patch
  embeddings after patch embedding and before positional embeddings are added;
- positional embeddings interpolated for every crop size (the official bicubic resampling with
  its +0.1 offset, so official checkpoints behave identically on 96 px local crops);
- forwards that return [CLS] plus all patch tokens, intermediate layers and the last block's
  attention (linear probe features, dense adaptors, occlusion and attention maps).

Parameter names equal the official iBOT/DINO ViT's, so released checkpoints load strictly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ibot.models.specs import ARCHITECTURES, SWIN_ARCHITECTURES, ArchSpec
from ibot.models.swin_transformer import IBOTSwinTransformer, build_swin

__all__ = ["ARCHITECTURES", "ArchSpec", "IBOTVisionTransformer", "IBOTSwinTransformer", "build_backbone"]


class IBOTVisionTransformer(VisionTransformer):
    """timm ViT (no classifier) with a mask token and crop-size-aware positional embeddings."""

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 masked_im_modeling: bool = True) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
                         drop_path_rate=drop_path_rate, dynamic_img_size=True, dynamic_img_pad=False)
        self.num_heads = num_heads
        self.depth = depth
        self.patch_size = patch_size
        # Official name; present even when unused so checkpoints round-trip without missing keys.
        self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim)) if masked_im_modeling else None

    # -- tokens -------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, h_patches: int, w_patches: int) -> Tensor:
        """Positional embeddings for an h×w patch grid (official iBOT/DINO resampling)."""
        num_patches = self.pos_embed.shape[1] - 1
        if h_patches * w_patches == num_patches and h_patches == w_patches:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(math.sqrt(num_patches))
        # +0.1 avoids floating point error in the scale factor (as in DINO/iBOT).
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2),
            scale_factor=((h_patches + 0.1) / side, (w_patches + 0.1) / side), mode="bicubic")
        assert patch_pos.shape[-2:] == (h_patches, w_patches)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, -1)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def prepare_tokens(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Patch-embed ``x`` [B,3,H,W]; replace masked patches ([B,h,w] bool) by the mask token; add pos."""
        batch, _, height, width = x.shape
        h_patches, w_patches = height // self.patch_size, width // self.patch_size
        x = self.patch_embed(x)  # [B, h, w, D] (dynamic_img_size keeps the grid)
        x = x.reshape(batch, h_patches * w_patches, -1)
        if mask is not None:
            if self.masked_embed is None:
                raise ValueError("this backbone was built with masked_im_modeling=False but got a mask")
            x = torch.where(mask.reshape(batch, -1, 1), self.masked_embed.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(h_patches, w_patches)
        return self.pos_drop(x)

    # -- forwards ------------------------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """All tokens after the final norm: [B, 1 + h*w, D] ([CLS] first)."""
        x = self.prepare_tokens(x, mask)
        x = self.blocks(x)
        return self.norm(x)

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1,  # type: ignore[override]
                                norm: bool = True) -> list[Tensor]:
        """Token outputs of the last ``n`` blocks (int) or of the given block indices, each [B,1+N,D]."""
        wanted = set(range(self.depth - n, self.depth)) if isinstance(n, int) else set(n)
        if not wanted <= set(range(self.depth)):
            raise ValueError(f"block indices {sorted(wanted)} out of range for depth {self.depth}")
        x = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in wanted:
                outputs.append(self.norm(x) if norm else x)
        return outputs

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block, [B, heads, 1+N, 1+N] (occlusion, attention maps)."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self._block_attention(self.blocks[-1], x)

    def get_last_tokens_and_selfattention(self, x: Tensor, norm: bool = False) -> tuple[Tensor, Tensor]:
        """The last block's output tokens [B, 1+N, D] (after the final norm if ``norm``) and its softmax
        attention [B, heads, 1+N, 1+N], from one forward (part-wise linear probing)."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        attention = self._block_attention(self.blocks[-1], x)
        x = self.blocks[-1](x)
        return (self.norm(x) if norm else x), attention

    @staticmethod
    def _block_attention(block: nn.Module, x: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) of ``block`` on its input tokens ``x``, [B, heads, T, T]."""
        attn = block.attn
        batch, tokens, dim = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, dim // attn.num_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def set_fused_attention(self, enabled: bool) -> None:
        """Use SDPA (default) or the explicit softmax(qk^T)v. Same math; on CPU under bf16 autocast
        PyTorch's fused kernel is 3-7x slower than the explicit one (bench/pretrain_step.py)."""
        for block in self.blocks:
            block.attn.fused_attn = enabled

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "masked_embed"}

    @property
    def mask_patch_size(self) -> int:
        """Pixels per cell of the iBOT mask: one patch (main_ibot.py:167)."""
        return self.patch_size


def build_backbone(arch: str, *, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0,
                   masked_im_modeling: bool = True, depth: int | None = None, window_size: int | None = None
                   ) -> IBOTVisionTransformer | IBOTSwinTransformer:
    """Build a registered architecture. ``depth`` overrides the block count (small embedded models);
    ``window_size`` is Swin's attention window (None: the size's default, official main_ibot.py:46: 7)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if arch in SWIN_ARCHITECTURES:
        if depth is not None:
            raise ValueError(f"models.<name>.depth: {depth} is a ViT-only override; {arch} has fixed stages "
                             f"{SWIN_ARCHITECTURES[arch].depths} (use swin_mini for a small model)")
        return build_swin(arch, patch_size=patch_size, img_size=img_size, window_size=window_size,
                          drop_path_rate=drop_path_rate, masked_im_modeling=masked_im_modeling)
    if window_size is not None:
        raise ValueError(f"models.<name>.window_size: {window_size} applies to Swin only, not {arch}")
    spec = ARCHITECTURES[arch]
    return IBOTVisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=spec.embed_dim,
                                 depth=depth or spec.depth, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio,
                                 drop_path_rate=drop_path_rate, masked_im_modeling=masked_im_modeling)
