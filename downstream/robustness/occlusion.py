"""Occlusion robustness on ImageNet val (iBOT Tab. 8 "S.5"/"NS.5"; Naseer et al., NeurIPS 2021).

Two protocols (``protocol``), both reporting top-1 (percent) at 0.5 plus the curves:

``official`` (default): bytedance/ibot ``analysis/occlusion/eval.py`` as run by
``analysis/eval_occlusion.sh`` (lines 7-11 ``--dino``, 1-5 ``--random_drop``, ``--model_name
vit_small``); line numbers at bytedance/ibot commit da316d8:

- saliency comes from a SEPARATE model, DINO ViT-S/16 (``eval.py:60-64``
  ``dino.dino_small(patch_size=16, pretrained=True)``; ``dino.py:403-418``: DINO's released
  ``dino_deitsmall16_pretrain.pth``), here ``saliency_model`` loaded through the one checkpoint
  loader (:mod:`ibot.checkpoint`), run on the same normalised image the classifier sees
  (``eval.py:170`` ``forward_selfattention(img.clone())``);
- its last block's [CLS]→patch attention of ONE head (``eval.py:168`` ``head_number = 1``, ``:171``),
  here ``saliency_model.head``;
- the salient set at mass λ (``eval.py:178-184``): patches sorted ascending by attention,
  normalised, cumulative mass ``> 1 - λ`` (:func:`official_salient_mask`);
- ``salient`` (``--drop_best``) zeroes the salient set, ``img * (1 - th_attn)``; ``nonsalient`` keeps
  only it, ``img * th_attn`` (``eval.py:194-197``), the patch mask upsampled nearest by the patch size
  (``:191-192``), pixels zeroed in the NORMALISED image; λ in 0.1..1.0 (``:350-357``);
- the information-loss ratio is the fraction of pixels removed (``eval.py:186-189``, ``:247``),
  ``extra.information_loss``;
- ``random`` zeroes ``k·N//10`` random patches of the ``crop/16``-px grid (``:329-338``, ``:132-158``;
  N = 196 at 224 px), here the saliency model's patch grid and ``floor(r·N)`` patches;
- eval transform Resize(256, bilinear: ``eval.py:109``, ``--bicubic_resize`` defaults False ``:301``)
  + CenterCrop(224) + ImageNet mean/std (``:110-116``, ``:262-263``, ``:299``); here resize/crop
  from the head (``resize``/``crop``), ``interpolation`` null = bilinear;
- the classifier is the evaluated backbone with its linear head (``eval.py:66-83``, ``--linear_eval``).

Deviation: the official random drop draws one pattern per batch of 1024 shuffled images
(``eval.py:35``, ``:123``, ``:152``, np seed 1), which depends on the batching; here each image has its
own pattern from (seed, image index), the same in distribution and independent of batching.

``self_attention``: the evaluated model's own last-block [CLS]→patch attention (mean over heads,
or ``attention_heads``) ranks the patches. At information-loss ratio ``r``, ``salient`` drops the
most-attended patches whose mass reaches ``r`` (patch p is dropped iff the mass ranked above it is
< r); ``nonsalient`` keeps exactly the patches ``salient`` would drop at ``1 - r``; ``random`` drops
``round(r · N)`` patches. ``drop: tokens`` (default) removes the dropped patch tokens after patch +
position embedding, [CLS] always kept; ``drop: zero_pixels`` zeroes the image patches instead.
Resize interpolation bicubic (the linear head's eval).

Keys per protocol: ``saliency_model`` applies to ``official`` only (ignored otherwise); ``drop`` and
``attention_heads`` to ``self_attention`` only (under ``official`` a value other than null, or
``zero_pixels`` for ``drop``, is an error, never silently ignored); ``interpolation`` to both (null =
the protocol's own).

Both: patch shuffle cuts the crop into ``h × w`` tiles (``h`` rows) that are randomly permuted, for the
official grids (``shuffle_grid_sizes: official``: (2,2), (2,4), (4,4), (4,8), (8,8), (14,14), (16,16) of
``analysis/eval_shuffle.sh:5-6`` as ``analysis/occlusion/eval.py:140-161`` cuts them; a grid that does not
divide the crop is skipped and recorded) or an explicit list. Randomness is per image (seed, image
index), independent of batching and of the process count (the official script draws one permutation per
batch of 1024 shuffled images).

Outputs beside metrics.json: ``curves.csv`` (mode, ratio, top-1, mean fraction of patches
dropped = information loss), ``shuffle.csv`` and ``occlusion.png``. Metrics (percent):
``clean_top1``, ``salient_0.5``, ``nonsalient_0.5``, ``random_0.5``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from downstream.engine.features import linear_features
from downstream.engine.linear import LinearClassifier
from downstream.engine.setup import build_eval_backbone, log
from downstream.robustness.common import (LabelledImages, RobustnessError, accumulate,
                                          common_extra, folder_samples, head_class_index, percent, prepare,
                                          shard_loader, robustness_protocol, write_robustness_metrics)
from ibot.checkpoint import BackboneCheckpoint, CheckpointError, load_file, sha256_file
from ibot.distributed import is_main
from ibot.io import atomic_write, write_csv_atomic
from ibot.models.specs import ARCHITECTURES, ModelSpec
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_evidence

__all__ = ["MODES", "PROTOCOLS", "REPORTED_RATIO", "DINO_VITS16_FILE", "resolve_config",
           "saliency_model_label", "protocol_label", "load_saliency_model", "head_attention",
           "official_salient_mask", "saliency", "salient_drop", "nonsalient_drop", "random_drop",
           "shuffle_patches", "zero_patches", "OFFICIAL_SHUFFLE_GRIDS", "grid_sizes", "logits_from_kept_tokens",
           "preflight", "run"]

MODES: tuple[str, ...] = ("salient", "nonsalient", "random")
PROTOCOLS: tuple[str, ...] = ("official", "self_attention")
REPORTED_RATIO = 0.5
_SALT = {"random": 1, "shuffle": 2}
#: DINO's released ViT-S/16 (``dino.py:409``), the official saliency model. Its sha256 is not published
#: (no hash in the name, none in DINO's hubconf), so it is recognised by file name + released layout.
DINO_VITS16_FILE = "dino_deitsmall16_pretrain.pth"
_SALIENCY_KEY = "robustness.occlusion.saliency_model.checkpoint"


# -- protocol ----------------------------------------------------------------------------------------
def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The stage config with the protocol's own values for the null keys (``drop``, ``attention_heads``,
    ``interpolation``); a key set that does not apply to the protocol is an error, not ignored."""
    resolved = dict(config)
    protocol = config["protocol"]
    if protocol == "official":
        if config["drop"] not in (None, "zero_pixels"):
            raise RobustnessError(f"occlusion.drop: {config['drop']!r} does not apply to protocol official (it "
                                  f"zeroes pixels as the official script); set it to null or protocol: self_attention")
        if config["attention_heads"] is not None:
            raise RobustnessError("occlusion.attention_heads applies to protocol self_attention only; under official "
                                  "the head is occlusion.saliency_model.head")
        resolved.update(drop="zero_pixels", attention_heads=None, interpolation=config["interpolation"] or "bilinear")
    elif protocol == "self_attention":
        resolved.update(drop=config["drop"] or "tokens",
                        attention_heads="mean" if config["attention_heads"] is None else config["attention_heads"],
                        interpolation=config["interpolation"] or "bicubic")
    else:
        raise RobustnessError(f"occlusion.protocol: {protocol!r}, expected one of {list(PROTOCOLS)}")
    if resolved["drop"] not in ("tokens", "zero_pixels"):
        raise RobustnessError(f"occlusion.drop: {resolved['drop']!r}, expected 'tokens' or 'zero_pixels'")
    return resolved


def _require_saliency_checkpoint(config: Mapping[str, Any]) -> str:
    path = config["saliency_model"]["checkpoint"]
    if path is None:
        raise RobustnessError(
            f"occlusion protocol official needs a saliency model: set {_SALIENCY_KEY} to its weights file, for the "
            f"paper's protocol DINO's released ViT-S/16 {DINO_VITS16_FILE} (https://dl.fbaipublicfiles.com/dino/"
            f"dino_deitsmall16_pretrain/{DINO_VITS16_FILE}; eval.py:60-64), or use protocol: self_attention")
    if not Path(path).is_file():
        raise RobustnessError(f"{_SALIENCY_KEY}: {path} is not a file")
    return str(path)


def saliency_model_label(spec: Mapping[str, Any]) -> str:
    """``<arch>/<patch>[-d<depth>]:<source>``: source is DINO's released file name (recognised by name;
    :func:`load_saliency_model` checks its layout), else the file's ``sha256=<first 8 hex>``, or ``unset``."""
    arch, depth = spec["arch"], spec["depth"]
    shape = f"{arch}/{int(spec['patch_size'])}"
    if depth is not None and arch in ARCHITECTURES and int(depth) != ARCHITECTURES[arch].depth:
        shape += f"-d{int(depth)}"
    path = spec["checkpoint"]
    if path is None:
        return f"{shape}:unset"
    if Path(path).name == DINO_VITS16_FILE and spec["checkpoint_key"] is None:
        return f"{shape}:{DINO_VITS16_FILE}"
    if not Path(path).is_file():
        raise RobustnessError(f"{_SALIENCY_KEY}: {path} is not a file")
    return f"{shape}:sha256={sha256_file(path)[:8]}"


def protocol_label(config: Mapping[str, Any], head_meta: Mapping[str, Any]) -> str:
    """The head's protocol plus how patches are ranked and occluded.

    official: ``occlusion(protocol=official,drop=zero_pixels,saliency=<model>,head=<h>,interpolation=<i>)``
    (+ ``,eval=<resize>/<crop>`` when not the head's sizes); with DINO's released ViT-S/16 this is the
    paper's row of results/reference/paper_protocols.csv. self_attention: ``occlusion(drop=<d>,
    saliency=self-attention-<heads>)`` (+ ``,interpolation=bilinear`` if so), never the paper's.
    """
    config = resolve_config(config)
    if config["protocol"] == "official":
        spec = config["saliency_model"]
        parts = ["protocol=official", "drop=zero_pixels", f"saliency={saliency_model_label(spec)}",
                 f"head={int(spec['head'])}", f"interpolation={config['interpolation']}"]
    else:
        parts = [f"drop={config['drop']}", f"saliency=self-attention-{config['attention_heads']}"]
        if config["interpolation"] != "bicubic":
            parts.append(f"interpolation={config['interpolation']}")
    if (config["resize"], config["crop"]) != ("head", "head"):
        parts.append(f"eval={config['resize']}/{config['crop']}")
    return f"{robustness_protocol(head_meta)},occlusion({','.join(parts)})"


# -- saliency model (official) ------------------------------------------------------------------------
def _check_dino_release_layout(path: str, backbone: nn.Module) -> None:
    """A file named like DINO's release must have its layout: a plain state dict of exactly the ViT's
    tensors (no container, no prefixes, no iBOT mask token), else the label would claim DINO wrongly."""
    obj = load_file(path)
    expected = set(backbone.state_dict())
    if not isinstance(obj, Mapping) or set(obj) != expected:
        keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise RobustnessError(f"{_SALIENCY_KEY}: {path} is named like DINO's release ({DINO_VITS16_FILE}) but is "
                              f"not its layout (a plain {len(expected)}-tensor ViT state dict); top-level keys: "
                              f"{keys}. Rename the file if it is another model.")


def load_saliency_model(spec: Mapping[str, Any], img_size: int, device: torch.device) -> nn.Module:
    """The separate saliency ViT (eval mode, frozen) through the one checkpoint loader, built at the
    checkpoint's native size (other crops interpolate the position table, as DINO's forward does)."""
    path = spec["checkpoint"]
    try:
        backbone = build_eval_backbone(ModelSpec.of(spec), BackboneCheckpoint(Path(path), spec["checkpoint_key"]),
                                       img_size)
    except (CheckpointError, ValueError) as error:  # unreadable file, another model, unknown arch
        raise RobustnessError(f"{_SALIENCY_KEY} ({spec['arch']}, patch {spec['patch_size']}): {error}") from error
    if Path(path).name == DINO_VITS16_FILE and spec["checkpoint_key"] is None:
        _check_dino_release_layout(path, backbone)
    if not 0 <= int(spec["head"]) < backbone.num_heads:
        raise RobustnessError(f"occlusion.saliency_model.head: {spec['head']} out of range ({spec['arch']} has "
                              f"{backbone.num_heads} heads)")
    return backbone.to(device)


@torch.no_grad()
def head_attention(model: nn.Module, images: Tensor, head: int) -> Tensor:
    """[CLS]→patch attention of one head of the last block, [B, N] (float32, as eval.py:170-171)."""
    return model.get_last_selfattention(images)[:, int(head), 0, 1:].float()


def official_salient_mask(attention: Tensor, lam: float) -> Tensor:
    """Bool [B, N]: the salient set at mass ``lam``, exactly eval.py:178-184.

    Ascending sort, normalise, cumulative sum; a patch is salient iff the cumulative mass up to and
    including it is ``> 1 - lam`` (equivalently: the mass ranked above it is ``< lam``). ``lam <= 0``:
    none (the official λ starts at 0.1); ``lam >= 1``: all (the formula's limit, ``cumval > 0``).
    """
    if lam <= 0:
        return torch.zeros_like(attention, dtype=torch.bool)
    if lam >= 1:
        return torch.ones_like(attention, dtype=torch.bool)
    values, order = torch.sort(attention, dim=-1, stable=True)
    values = values / values.sum(dim=-1, keepdim=True)
    th_attn = values.cumsum(dim=-1) > (1 - lam)
    return torch.zeros_like(th_attn).scatter(-1, order, th_attn)  # back to patch order (eval.py:182-184)


# -- patch selection (self_attention) -----------------------------------------------------------------
@torch.no_grad()
def saliency(backbone, images: Tensor, heads: str | int = "mean") -> Tensor:
    """[CLS]→patch attention of the last block, [B, N], normalised to sum 1 (float64)."""
    attention = backbone.get_last_selfattention(images)[:, :, 0, 1:]
    if heads == "mean":
        attention = attention.mean(dim=1)
    else:
        head = int(heads)
        if not 0 <= head < attention.shape[1]:
            raise RobustnessError(f"occlusion.attention_heads: head {head} out of range (model has "
                                  f"{attention.shape[1]} heads)")
        attention = attention[:, head]
    attention = attention.double()
    return attention / attention.sum(dim=-1, keepdim=True)


def salient_drop(sal: Tensor, ratio: float) -> Tensor:
    """Bool [B, N]: the most salient patches holding attention mass ``ratio`` (see module doc)."""
    if ratio <= 0:
        return torch.zeros_like(sal, dtype=torch.bool)
    if ratio >= 1:
        return torch.ones_like(sal, dtype=torch.bool)
    values, order = sal.sort(dim=-1, descending=True, stable=True)
    above = torch.cat((torch.zeros_like(values[:, :1]), values.cumsum(dim=-1)[:, :-1]), dim=-1)  # mass ranked above
    drop = torch.zeros_like(sal, dtype=torch.bool)
    return drop.scatter(-1, order, above < ratio)


def nonsalient_drop(sal: Tensor, ratio: float) -> Tensor:
    """Bool [B, N]: everything except the salient set at ``1 - ratio``."""
    return ~salient_drop(sal, 1.0 - ratio)


def _generator(seed: int, salt: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + salt * 7_919) * 1_000_033 + int(index))


def random_drop(num_patches: int, ratio: float, indices: Tensor, seed: int, *, floor: bool = False) -> Tensor:
    """Bool [B, N]: ``round(ratio · N)`` (``floor`` as eval.py:336 ``k*196//10``) random patches per image
    (per-image permutation, nested in ratio)."""
    exact = ratio * num_patches
    count = math.floor(exact + 1e-9) if floor else round(exact)
    count = min(num_patches, max(0, count))
    drop = torch.zeros(len(indices), num_patches, dtype=torch.bool)
    for row, index in enumerate(indices.tolist()):
        drop[row, torch.randperm(num_patches, generator=_generator(seed, _SALT["random"], index))[:count]] = True
    return drop


def shuffle_patches(images: Tensor, grid: tuple[int, int], indices: Tensor, seed: int) -> Tensor:
    """Cut each image into ``h × w`` tiles (``grid = (h, w)``: rows, columns) and permute them per image
    (analysis/occlusion/eval.py:147-158's ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)`` and back)."""
    batch, channels, height, width = images.shape
    gh, gw = grid
    if height % gh or width % gw:
        raise RobustnessError(f"patch shuffle: grid {gh}x{gw} does not divide the {height}x{width} crop")
    th, tw = height // gh, width // gw
    tiles = images.reshape(batch, channels, gh, th, gw, tw).permute(0, 2, 4, 1, 3, 5).reshape(
        batch, gh * gw, channels, th, tw)
    perms = torch.stack([torch.randperm(gh * gw, generator=_generator(seed, _SALT["shuffle"] + 100 * gh + gw, i))
                         for i in indices.tolist()]).to(images.device)
    tiles = torch.gather(tiles, 1, perms[:, :, None, None, None].expand_as(tiles))
    return tiles.reshape(batch, gh, gw, channels, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(
        batch, channels, height, width)


def zero_patches(images: Tensor, drop: Tensor, patch_size: int) -> Tensor:
    """Zero (in normalised space) the image patches flagged in ``drop`` [B, N]: ``images * (1 - mask)``
    with the patch mask upsampled nearest by the patch size (eval.py:191-197)."""
    batch, _, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    mask = drop.reshape(batch, 1, grid_h, grid_w).to(images.dtype)
    mask = mask.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return images * (1.0 - mask.to(images.device))


#: The official shuffle grids (h, w): analysis/eval_shuffle.sh:5-6 ``--shuffle_h 2 2 4 4 8 14 16
#: --shuffle_w 2 4 4 8 8 14 16``.
OFFICIAL_SHUFFLE_GRIDS: tuple[tuple[int, int], ...] = ((2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (14, 14), (16, 16))


def grid_sizes(setting: str | Sequence[int | Sequence[int]], crop: int
               ) -> tuple[list[tuple[int, int]], list[str]]:
    """The (h, w) shuffle grids to evaluate and the official ones skipped because they do not divide the crop.

    ``official``: :data:`OFFICIAL_SHUFFLE_GRIDS`; else a list of ``[h, w]`` pairs or ``g`` (``g x g``), each of
    which must divide the crop."""
    if setting == "official":
        grids = [grid for grid in OFFICIAL_SHUFFLE_GRIDS if crop % grid[0] == 0 and crop % grid[1] == 0]
        return grids, [f"{h}x{w}" for h, w in OFFICIAL_SHUFFLE_GRIDS if (h, w) not in grids]
    grids = [(int(g), int(g)) if isinstance(g, int) else (int(g[0]), int(g[1])) for g in setting]
    bad = [f"{h}x{w}" for h, w in grids if min(h, w) < 1 or crop % h or crop % w]
    if bad:
        raise RobustnessError(f"occlusion.shuffle_grid_sizes: {bad} do not divide the crop ({crop} px)")
    return grids, []


# -- token dropping --------------------------------------------------------------------------------
class _PrecomputedLayers:
    """Stands in for the backbone inside the feature function: returns precomputed block outputs."""

    def __init__(self, backbone: nn.Module, outputs: dict[int, Tensor]) -> None:
        self._backbone, self._outputs = backbone, outputs

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, norm: bool = True) -> list[Tensor]:
        depth = len(self._backbone.blocks)
        wanted = list(range(depth - n, depth)) if isinstance(n, int) else sorted(set(n))
        if not norm or any(i not in self._outputs for i in wanted):
            raise RobustnessError(f"feature function asked for blocks {wanted} (norm={norm}); computed "
                                  f"{sorted(self._outputs)} with the final norm")
        return [self._outputs[i] for i in wanted]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)


def logits_from_kept_tokens(model: LinearClassifier, images: Tensor, keep: Tensor) -> Tensor:
    """Logits when only the patch tokens with ``keep`` [B, N] (bool) enter the transformer.

    Dropped tokens are *removed* from the sequence after patch + position embedding ([CLS] always
    stays), as in Naseer et al. (2021). Images with different kept counts share a batch: kept
    tokens are packed first, padding keys are masked out of every attention, and padded positions
    of the block outputs are set to the mean of the kept patch tokens (the [CLS] output when none
    is kept) so that any patch-average in the feature function sees exactly the kept tokens. The
    features are assembled by the linear stage's own feature function (:func:`linear_features`), so
    they match the head's training features exactly.
    """
    backbone = model.backbone
    tokens = backbone.prepare_tokens(images)
    batch, num_patches = keep.shape
    if tokens.shape[1] != num_patches + 1:
        raise RobustnessError(f"keep mask has {num_patches} patches, the image gives {tokens.shape[1] - 1}")
    keep = keep.to(tokens.device)
    counts = keep.sum(1)
    length = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :length]
    patches = torch.gather(tokens[:, 1:], 1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    valid = torch.arange(length, device=tokens.device).unsqueeze(0) < counts.unsqueeze(1)
    x = torch.cat((tokens[:, :1], patches), dim=1)
    attn_mask = None
    if not bool(valid.all()):
        keys = torch.cat((torch.ones_like(valid[:, :1]), valid), dim=1)
        attn_mask = torch.zeros(batch, 1, 1, length + 1, dtype=x.dtype, device=x.device)
        attn_mask.masked_fill_(~keys[:, None, None, :], float("-inf"))
    depth = len(backbone.blocks)
    wanted = set(range(depth - model.n_last_blocks, depth))
    outputs: dict[int, Tensor] = {}
    for index, block in enumerate(backbone.blocks):
        x = block(x, attn_mask=attn_mask) if attn_mask is not None else block(x)
        if index in wanted:
            out = backbone.norm(x)
            if attn_mask is not None:
                patch = out[:, 1:]
                mean = (patch * valid.unsqueeze(-1)).sum(1) / counts.clamp(min=1).unsqueeze(-1).to(patch.dtype)
                mean = torch.where((counts > 0).unsqueeze(-1), mean, out[:, 0])
                out = torch.cat((out[:, :1], torch.where(valid.unsqueeze(-1), patch, mean.unsqueeze(1))), dim=1)
            outputs[index] = out
    features = linear_features(_PrecomputedLayers(backbone, outputs), images, model.n_last_blocks,
                               model.avgpool_patchtokens)
    return model.linear(features.float())


# -- stage -----------------------------------------------------------------------------------------
def _drop_logits(net: LinearClassifier, images: Tensor, drop: Tensor, mode: str) -> Tensor:
    if mode == "tokens":
        return logits_from_kept_tokens(net, images, ~drop.to(images.device))
    return net(zero_patches(images, drop.to(images.device), int(net.backbone.patch_size)))


def _plot(path: Path, ratios: list[float], curves: dict[str, list[float]], clean: float,
          shuffle: list[tuple[tuple[int, int], float]], title: str, xlabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, values in curves.items():
        axes[0].plot(ratios, values, marker="o", label=f"{mode} drop")
    axes[0].axhline(clean, color="grey", linestyle="--", linewidth=1, label="clean")
    axes[0].set_xlabel(xlabel)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].set_title("patch drop")
    axes[0].legend()
    if shuffle:
        axes[1].plot([h * w for (h, w), _ in shuffle], [v for _, v in shuffle], marker="o")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xticks([h * w for (h, w), _ in shuffle], [f"{h}x{w}" for (h, w), _ in shuffle])
    axes[1].axhline(clean, color="grey", linestyle="--", linewidth=1)
    axes[1].set_xlabel("shuffle grid")
    axes[1].set_ylabel("top-1 (%)")
    axes[1].set_title("patch shuffle")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, dpi=100, format="png")
    plt.close(fig)


def _official_drop(mode: str, attention: Tensor | None, ratio: float, grid: int, indices: Tensor,
                   seed: int) -> Tensor:
    """Patches [B, N] zeroed under the official protocol (``nonsalient`` keeps only the salient set)."""
    if mode == "salient":
        return official_salient_mask(attention, ratio)
    if mode == "nonsalient":
        return ~official_salient_mask(attention, ratio)
    return random_drop(grid * grid, ratio, indices, seed, floor=True)


def _self_attention_drop(mode: str, sal: Tensor | None, ratio: float, num_patches: int, indices: Tensor,
                         seed: int) -> Tensor:
    if mode == "salient":
        return salient_drop(sal, ratio)
    if mode == "nonsalient":
        return nonsalient_drop(sal, ratio)
    return random_drop(num_patches, ratio, indices, seed)


def _ratio_definitions(protocol: str) -> dict[str, str]:
    if protocol == "official":
        return {"salient": "attention mass dropped (lambda)", "nonsalient": "attention mass kept (lambda)",
                "random": "patch fraction"}
    return {"salient": "attention mass", "nonsalient": "attention mass", "random": "patch fraction"}


def preflight(config: Mapping[str, Any]) -> None:
    """What the workflow checks before any job (registry ``preflight``): the protocol's keys and,
    under the official protocol, that a saliency checkpoint is set (Snakemake checks it exists)."""
    if resolve_config(config)["protocol"] == "official" and config["saliency_model"]["checkpoint"] is None:
        _require_saliency_checkpoint(config)


def run(ctx: StageContext) -> dict[str, float]:
    """Clean, occluded and shuffled top-1 of backbone + linear head; curves, plot and metrics.json."""
    ctx = replace(ctx, config=resolve_config(ctx.config))  # protocol keys checked before any work; recorded resolved
    config, seed = ctx.config, ctx.seed
    official = config["protocol"] == "official"
    saliency_path = _require_saliency_checkpoint(config) if official else None
    modes = list(config["modes"])
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise RobustnessError(f"occlusion: modes {modes} must be among {list(MODES)}")
    ratios = sorted({float(r) for r in config["ratios"]} | {REPORTED_RATIO})
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise RobustnessError(f"occlusion.ratios: {ratios} must lie in [0, 1]")
    net, transform, sizes, device = prepare(ctx)
    crop = sizes["crop"]
    spec = config["saliency_model"]
    if official:
        sal_model = load_saliency_model(spec, crop, device)
        patch, sal_head = int(spec["patch_size"]), int(spec["head"])
    else:
        sal_model, patch, sal_head = None, int(net.backbone.patch_size), None
    if crop % patch:
        raise RobustnessError(f"occlusion: crop {crop} px is not a multiple of the patch size {patch}")
    grid = crop // patch
    num_patches = grid * grid
    grids, skipped_grids = grid_sizes(config["shuffle_grid_sizes"], crop)
    folder = ctx.data_root / config["split"]
    dataset = LabelledImages(folder_samples(folder, head_class_index(net.classes), what=f"ImageNet {folder}",
                                            max_per_class=config["max_images_per_class"]), transform)
    log(f"[occlusion] protocol {config['protocol']}, {len(dataset)} images, {num_patches} patches, modes {modes} x "
        f"{len(ratios)} ratios, shuffle grids {grids} (skipped: {skipped_grids}), drop={config['drop']}, "
        f"device {device}")
    n_ratios = len(ratios)
    ranked = bool({"salient", "nonsalient"} & set(modes))

    def step(images, targets, indices):
        result = {"total": torch.tensor([len(targets)]), "clean": net(images).argmax(-1).eq(targets).sum().reshape(1)}
        if official:  # the separate model's one head, on the classifier's normalised input (eval.py:170)
            ranking = head_attention(sal_model, images, sal_head) if ranked else None
        else:
            ranking = saliency(net.backbone, images, config["attention_heads"]) if ranked else None
        for mode in modes:
            correct = torch.zeros(n_ratios, dtype=torch.float64, device=images.device)
            dropped = torch.zeros(n_ratios, dtype=torch.float64, device=images.device)
            for i, ratio in enumerate(ratios):
                if official:
                    drop = _official_drop(mode, ranking, ratio, grid, indices, seed)
                    logits = net(zero_patches(images, drop.to(images.device), patch))
                else:
                    drop = _self_attention_drop(mode, ranking, ratio, num_patches, indices, seed)
                    logits = _drop_logits(net, images, drop, config["drop"])
                correct[i] = logits.argmax(-1).eq(targets).sum()
                dropped[i] = drop.double().mean(dim=1).sum()
            result[f"{mode}/correct"], result[f"{mode}/dropped"] = correct, dropped
        if grids:
            result["shuffle"] = torch.stack([net(shuffle_patches(images, g, indices, seed)).argmax(-1).eq(targets).sum()
                                             for g in grids])
        return result

    zeros: dict[str, int] = {"total": 1, "clean": 1, **({"shuffle": len(grids)} if grids else {})}
    for mode in modes:
        zeros[f"{mode}/correct"] = zeros[f"{mode}/dropped"] = n_ratios
    counts = accumulate(shard_loader(dataset, config["batch_size"], config["num_workers"]), step, zeros,
                        device=device, desc="occlusion")

    if not is_main():
        return {}
    total = counts["total"][0]
    clean = percent(counts["clean"][0], total)
    metrics: dict[str, float] = {"clean_top1": clean}
    rows, curves, loss = [], {}, {}
    definitions = _ratio_definitions(config["protocol"])
    for mode in modes:
        curves[mode] = [percent(c, total) for c in counts[f"{mode}/correct"]]
        loss[mode] = [round(float(d / total), 6) for d in counts[f"{mode}/dropped"]]
        for i, ratio in enumerate(ratios):
            rows.append({"mode": mode, "ratio": ratio, "top1": round(curves[mode][i], 4),
                         "dropped_patch_fraction": loss[mode][i], "ratio_definition": definitions[mode]})
        metrics[f"{mode}_{REPORTED_RATIO}"] = curves[mode][ratios.index(REPORTED_RATIO)]
    shuffle = [(g, percent(counts["shuffle"][i], total)) for i, g in enumerate(grids)]
    out_dir = ctx.dir
    write_csv_atomic(out_dir / "curves.csv", rows, ["mode", "ratio", "top1", "dropped_patch_fraction", "ratio_definition"])
    write_csv_atomic(out_dir / "shuffle.csv", [{"grid": f"{h}x{w}", "tile_px": f"{crop // h}x{crop // w}",
                                                "top1": round(v, 4)} for (h, w), v in shuffle],
                     ["grid", "tile_px", "top1"])
    _plot(out_dir / "occlusion.png", ratios, curves, clean, shuffle,
          f"{ctx.name}: occlusion ({config['protocol']}, {config['drop']})",
          "lambda (salient attention mass)" if official else "information loss ratio")
    extra = common_extra(net, sizes, device)
    extra.update({
        "protocol": config["protocol"], "num_images": int(total), "num_patches": num_patches, "ratios": ratios,
        "curves": curves, "shuffle": {f"{h}x{w}": v for (h, w), v in shuffle}, "shuffle_skipped": skipped_grids,
        "drop": config["drop"],
        "information_loss": loss,  # fraction of pixels (official) / patch tokens removed, per ratio
        f"information_loss_{REPORTED_RATIO}": {m: loss[m][ratios.index(REPORTED_RATIO)] for m in modes},
        "ratio_definition": definitions,
        "outputs": ["curves.csv", "shuffle.csv", "occlusion.png"],
    })
    if official:
        extra["saliency"] = f"separate model's last-block [CLS] attention, head {sal_head}"
        extra["saliency_model"] = {**spec, "sha256": sha256_file(saliency_path),
                                   "num_heads": int(sal_model.num_heads)}
    else:
        extra["saliency"] = f"model's own last-block [CLS] attention ({config['attention_heads']} head(s))"
    intervals, baselines = accuracy_evidence(metrics, dataset.labels.numpy(), net.num_classes)
    write_robustness_metrics(ctx, dataset="imagenet-val", metrics=metrics, extra=extra, head_meta=net.head.meta,
                             protocol=protocol_label(config, net.head.meta), intervals=intervals, baselines=baselines)
    return metrics
