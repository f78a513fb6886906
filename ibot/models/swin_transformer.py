"""Swin Transformer backbone for iBOT: timm's SwinTransformer plus the official iBOT additions.

timm provides the stages (window attention with relative position bias, shifted windows with
padding and run-time attention masks for any crop size, patch merging, drop path). What iBOT adds
(official models/swin_transformer.py at da316d8):
- a learnable mask token ``masked_embed`` [1, C0] (zero-init, :600-602) written over the *patch
  embeddings* (after the patch-embedding norm, before the stages) wherever the iBOT mask is set.
  The mask itself lives on the *final-stage* grid (main_ibot.py:167 generates it with
  ``pred_size = patch_size * 8``) and is nearest-upsampled to the patch-embedding grid by
  ``repeat_interleave`` (``mask_model``, :832-841);
- the token output the iBOT head consumes: ``[avg-pooled "CLS", final-stage tokens]`` after the final
  norm (``forward`` with ``return_all_tokens``, :622-645): Swin has no [CLS] token, so the average of
  the final tokens stands in for it, and the patch loss uses the final-stage tokens;
- ``get_intermediate_layers`` (:678-722): per block of the last ``n``, ``[avg, tokens]`` with the final
  norm applied only to blocks of the last stage (the linear-probe feature of eval_linear.py:99-103,
  run.sh's ``LINEAR_N_LAST_BLOCKS=4`` for swin).

The official model uses ``LayerNorm(eps=1e-6)`` everywhere (:548), which we pass to timm. Parameter
names are timm's; official checkpoints are mapped by :func:`ibot.checkpoint.load_backbone_weights`
(timm's ``checkpoint_filter_fn``: the official stage ``i`` downsample is timm's stage ``i+1``).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

from ibot.models.specs import SWIN_ARCHITECTURES, SwinSpec

__all__ = ["SwinSpec", "SWIN_ARCHITECTURES", "IBOTSwinTransformer", "build_swin"]


class OfficialPaddingSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the official order for grids the window does not tile: pad, *then* shift.

    For crops whose stage grid is not a multiple of the window (the 96 px local crops: grid 24 with
    window 7) the official block pads the normed map with zeros and rolls the padded map (official
    :259-308, mask from the padded size :233-256); timm rolls first and pads after, which attends over
    different neighbours. Tiled grids (224 px global crops) give identical results either way.
    """

    def _attn(self, x: Tensor) -> Tensor:
        _, height, width, channels = x.shape
        pad_h = (self.window_size[0] - height % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - width % self.window_size[1]) % self.window_size[1]
        x = torch.nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        _, padded_h, padded_w, _ = x.shape
        has_shift = any(self.shift_size)
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        attn_mask = self.get_attn_mask(x) if self.dynamic_mask else self.attn_mask
        windows = self.attn(windows, mask=attn_mask).view(-1, self.window_size[0], self.window_size[1], channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if has_shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class IBOTSwinTransformer(SwinTransformer):
    """timm Swin (no classifier) with the iBOT mask token and [avg, tokens] outputs.

    ``embed_dim`` is the width of the *output* tokens (as ``student.num_features`` in main_ibot.py:203),
    so heads and evaluations size themselves like for a ViT; ``patch_embed_dim`` is the stage-1 width.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 4, patch_embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 masked_im_modeling: bool = True) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, num_classes=0, embed_dim=patch_embed_dim,
                         depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                         mlp_ratio=mlp_ratio, qkv_bias=True, drop_path_rate=drop_path_rate,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), strict_img_size=False)
        for stage in self.layers:
            for block in stage.blocks:
                block.__class__ = OfficialPaddingSwinBlock  # same parameters; only the padding order differs
        self.patch_embed_dim = patch_embed_dim
        self.embed_dim = self.num_features
        self.patch_size = patch_size
        self.window_size = window_size
        self.depths = tuple(depths)
        self.depth = sum(self.depths)
        #: Output width of every block in order (linear-probe feature size, eval_linear.py:99-103).
        self.block_dims = tuple(patch_embed_dim * 2 ** i for i, d in enumerate(self.depths) for _ in range(d))
        # Official name; present even when unused so checkpoints round-trip without missing keys.
        self.masked_embed = nn.Parameter(torch.zeros(1, patch_embed_dim)) if masked_im_modeling else None

    @property
    def mask_patch_size(self) -> int:
        """Pixels per cell of the iBOT mask: one final-stage token (main_ibot.py:167, patch_size * 8)."""
        return self.patch_size * 2 ** (len(self.depths) - 1)

    # -- tokens -------------------------------------------------------------------------------
    def prepare_tokens(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Patch-embed ``x`` [B,3,H,W] → [B,h,w,C0]; masked cells ([B,h',w'] bool on the final-stage
        grid, upsampled to the patch grid as official ``mask_model``) get the mask token."""
        x = self.patch_embed(x)
        if mask is None:
            return x
        if self.masked_embed is None:
            raise ValueError("this backbone was built with masked_im_modeling=False but got a mask")
        grid, cells = tuple(x.shape[1:3]), tuple(mask.shape[-2:])
        if any(g % c for g, c in zip(grid, cells)) or mask.shape[0] != x.shape[0]:
            raise ValueError(f"mask {tuple(mask.shape)} does not tile the patch grid {grid} of a batch of "
                             f"{x.shape[0]} (masks must be on the {self.mask_patch_size}-px final-stage grid)")
        mask = mask.repeat_interleave(grid[0] // cells[0], -2).repeat_interleave(grid[1] // cells[1], -1)
        return torch.where(mask.unsqueeze(-1), self.masked_embed.to(x.dtype), x)

    @staticmethod
    def _with_avg(tokens: Tensor) -> Tensor:
        """[B,h,w,C] → [B, 1+h*w, C]: the token average first (Swin's stand-in for [CLS], :638-644)."""
        tokens = tokens.flatten(1, 2)
        return torch.cat((tokens.mean(dim=1, keepdim=True), tokens), dim=1)

    # -- forwards -----------------------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """[avg, final-stage tokens] after the final norm: [B, 1 + h'*w', embed_dim]."""
        x = self.layers(self.prepare_tokens(x, mask))
        return self._with_avg(self.norm(x))

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1,  # type: ignore[override]
                                norm: bool = True) -> list[Tensor]:
        """Outputs of the last ``n`` blocks (int) or the given block indices, each [B, 1+N_s, C_s] with the
        average first; the final norm applies to last-stage blocks only (official :700-716)."""
        wanted = set(range(self.depth - n, self.depth)) if isinstance(n, int) else set(n)
        if not wanted <= set(range(self.depth)):
            raise ValueError(f"block indices {sorted(wanted)} out of range for {self.depth} Swin blocks")
        x = self.prepare_tokens(x)
        outputs, index, last = [], 0, len(self.layers) - 1
        for stage_index, stage in enumerate(self.layers):
            x = stage.downsample(x)  # timm merges patches at the start of a stage (official: at the end)
            for block in stage.blocks:
                x = block(x)
                if index in wanted:
                    outputs.append(self._with_avg(self.norm(x) if norm and stage_index == last else x))
                index += 1
        return outputs

    def linear_feature_dim(self, n_last_blocks: int, avgpool_patchtokens: int) -> int:
        """Size of the official Swin linear-probe feature: the averages of the last ``n_last_blocks``
        blocks, each of its stage's width (eval_linear.py:99-103). Only ``avgpool_patchtokens`` 0 is
        defined for Swin: the "CLS" already is the token average, and the official feature size ignores
        the option (1 or 2 would not match the classifier there)."""
        if int(avgpool_patchtokens) != 0:
            raise ValueError(f"linear.avgpool_patchtokens: {avgpool_patchtokens!r} is a ViT-only option; Swin's "
                             "feature is already the token average (use 0, eval_linear.py:99-103)")
        if not 1 <= n_last_blocks <= self.depth:
            raise ValueError(f"linear.n_last_blocks: {n_last_blocks} but the Swin backbone has {self.depth} blocks")
        return sum(self.block_dims[-n_last_blocks:])

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        raise NotImplementedError("attention maps of the [CLS] token are ViT-only: Swin has no [CLS] token")

    def set_fused_attention(self, enabled: bool) -> None:
        """Use SDPA or the explicit softmax(qk^T)v in every window attention (same math)."""
        for stage in self.layers:
            for block in stage.blocks:
                block.attn.fused_attn = enabled

    def no_weight_decay(self) -> set[str]:
        return {"masked_embed"}


def build_swin(arch: str, *, patch_size: int = 4, img_size: int = 224, window_size: int | None = None,
               drop_path_rate: float = 0.0, masked_im_modeling: bool = True) -> IBOTSwinTransformer:
    """Build a registered Swin size (``window_size``: 7 for Swin-T/7, 14 for Swin-T/14; None: the size's default)."""
    if arch not in SWIN_ARCHITECTURES:
        raise ValueError(f"unknown Swin architecture {arch!r}; expected one of {sorted(SWIN_ARCHITECTURES)}")
    if patch_size != 4:  # the schema's ViT default 16 would silently build a 4x coarser Swin
        raise ValueError(f"models.<name>.patch_size: {patch_size} for {arch}; Swin uses 4 px patches (official "
                         "README --patch_size 4; eval_linear.py:82 and eval_knn.py:96 force it): set patch_size: 4")
    spec = SWIN_ARCHITECTURES[arch]
    return IBOTSwinTransformer(img_size=img_size, patch_size=patch_size, patch_embed_dim=spec.patch_embed_dim,
                               depths=spec.depths, num_heads=spec.num_heads,
                               window_size=window_size or spec.window_size,
                               mlp_ratio=spec.mlp_ratio, drop_path_rate=drop_path_rate,
                               masked_im_modeling=masked_im_modeling)
