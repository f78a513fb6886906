"""The architecture registry: names and sizes of every backbone, without torch.

Why its own module: the workflow validates ``models.<name>.arch`` against these names when Snakemake
parses the Snakefile; importing the model code (torch, timm, torchvision) there cost every
``snakemake`` call ~8 s. The models (:mod:`ibot.models.vision_transformer`,
:mod:`ibot.models.swin_transformer`) build from these specs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ArchSpec", "SwinSpec", "VIT_ARCHITECTURES", "SWIN_ARCHITECTURES", "ARCHITECTURES"]


@dataclass(frozen=True)
class ArchSpec:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


#: Registry of supported architectures (the official iBOT ViT sizes).
VIT_ARCHITECTURES: dict[str, ArchSpec] = {
    "vit_tiny": ArchSpec(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ArchSpec(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ArchSpec(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ArchSpec(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass(frozen=True)
class SwinSpec:
    """A Swin size: patch-embedding width, blocks and heads per stage."""

    patch_embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: float = 4.0
    #: default attention window (official main_ibot.py:46: 7; Swin-T/14 sets 14 in models.<name>.window_size)
    window_size: int = 7

    @property
    def depth(self) -> int:
        """Total number of blocks (what ``n_last_blocks`` counts)."""
        return sum(self.depths)

    @property
    def embed_dim(self) -> int:
        """Width of the output tokens (last stage), the iBOT head's input (main_ibot.py:203)."""
        return self.patch_embed_dim * 2 ** (len(self.depths) - 1)


#: ``swin_tiny``: official models/swin_transformer.py:843-848 (96, 2-2-6-2, 3-6-12-24).
#: ``swin_mini``: embedded size (ours) for 64 px crops on 2 CPU cores; same 4-stage layout.
SWIN_ARCHITECTURES: dict[str, SwinSpec] = {
    "swin_tiny": SwinSpec(patch_embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    # 4 px patches of a 64 px crop: grids 16/8/4/2, a 4-token window tiles all of them (no padding).
    "swin_mini": SwinSpec(patch_embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16), window_size=4),
}

#: Every backbone by name (ViT and Swin sizes share one enum and one builder, build_backbone).
ARCHITECTURES: dict[str, ArchSpec | SwinSpec] = {**VIT_ARCHITECTURES, **SWIN_ARCHITECTURES}
