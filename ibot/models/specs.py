"""The architecture registry: names and sizes of every backbone, without torch.

Why its own module: the workflow validates ``models.<name>.arch`` against these names when Snakemake
parses the Snakefile; importing the model code (torch, timm, torchvision) there cost every
``snakemake`` call ~8 s. The models (:mod:`ibot.models.vision_transformer`,
:mod:`ibot.models.swin_transformer`) build from these specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["ArchSpec", "SwinSpec", "ModelSpec", "VIT_ARCHITECTURES", "SWIN_ARCHITECTURES", "ARCHITECTURES",
           "TIMM_ARCHITECTURES", "spec_from_timm_name"]


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


@dataclass(frozen=True)
class ModelSpec:
    """What defines a backbone: ``models.<name>``'s ``arch``, ``patch_size``, ``depth``, ``window_size``.

    The one typed value every stage, fingerprint, CLI and result label derives from. ``as_dict`` leaves
    ``window_size`` out when unset, so ViT specs (and the work-dir fingerprints made from them) stay
    those of the keys that define a ViT.
    """

    arch: str
    patch_size: int = 16
    depth: int | None = None          # ViT block count override (embedded models)
    window_size: int | None = None    # Swin attention window (None: the size's default)

    @classmethod
    def of(cls, value: "ModelSpec | Mapping[str, Any]") -> "ModelSpec":
        """A spec from a spec or a mapping with its keys (a ``models.<name>`` entry, a head's meta)."""
        if isinstance(value, cls):
            return value
        return cls(arch=str(value["arch"]), patch_size=int(value.get("patch_size") or 16),
                   depth=None if value.get("depth") is None else int(value["depth"]),
                   window_size=None if value.get("window_size") is None else int(value["window_size"]))

    def as_dict(self) -> dict[str, Any]:
        spec = {"arch": self.arch, "patch_size": self.patch_size, "depth": self.depth}
        return {**spec, "window_size": self.window_size} if self.window_size is not None else spec

    def cli_args(self) -> list[str]:
        """The backbone flags of the stage command line (``add_arguments`` reads them back)."""
        args = ["--arch", self.arch, "--patch-size", str(self.patch_size)]
        args += ["--depth", str(self.depth)] if self.depth is not None else []
        return args + (["--window-size", str(self.window_size)] if self.window_size is not None else [])

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--arch", default="vit_small", choices=sorted(ARCHITECTURES), help="backbone architecture")
        parser.add_argument("--patch-size", type=int, default=16)
        parser.add_argument("--depth", type=int, default=None, help="override the ViT block count (embedded models)")
        parser.add_argument("--window-size", type=int, default=None, help="Swin attention window (swin_* archs)")

    @classmethod
    def from_args(cls, args) -> "ModelSpec":
        return cls(arch=args.arch, patch_size=args.patch_size, depth=args.depth, window_size=args.window_size)

    @property
    def size(self) -> ArchSpec | SwinSpec:
        return ARCHITECTURES[self.arch]

    @property
    def num_blocks(self) -> int:
        return self.depth or self.size.depth


#: The timm architecture each backbone is (the same module tree and parameter names): ``ibot export`` writes
#: a backbone under this name (plus ``model_args`` for sizes the name does not carry: an embedded depth,
#: Swin-T/14's window, swin_mini's widths), and a ``models.<name>.timm_model`` entry names one of these.
TIMM_ARCHITECTURES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch{patch}_224", "vit_small": "vit_small_patch{patch}_224",
    "vit_base": "vit_base_patch{patch}_224", "vit_large": "vit_large_patch{patch}_224",
    "swin_tiny": "swin_tiny_patch4_window7_224", "swin_mini": "swin_tiny_patch4_window7_224",
}


def spec_from_timm_name(name: str) -> ModelSpec:
    """The spec of a timm ViT/Swin-T architecture name (a pretrained tag after ``.`` is ignored), e.g.
    ``vit_small_patch16_224.dino`` -> vit_small/16, ``swin_tiny_patch4_window7_224`` -> swin_tiny/4, window 7."""
    import re

    base = name.split(".", 1)[0]
    vit = re.fullmatch(r"(vit_(?:tiny|small|base|large))_patch(\d+)_\d+", base)
    if vit:
        return ModelSpec(arch=vit.group(1), patch_size=int(vit.group(2)))
    swin = re.fullmatch(r"swin_tiny_patch4_window(\d+)_\d+", base)
    if swin:
        return ModelSpec(arch="swin_tiny", patch_size=4, window_size=int(swin.group(1)))
    raise ValueError(f"timm model {name!r}: not an architecture of this project; expected vit_<tiny|small|base|large>_"
                     f"patch<P>_<size> or swin_tiny_patch4_window<W>_<size> (a pretrained tag after '.' is allowed)")
