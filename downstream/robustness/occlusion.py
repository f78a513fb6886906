"""Occlusion robustness on ImageNet val (iBOT Tab. 8 "S.5"/"NS.5"; Naseer et al., NeurIPS 2021).

For every val image (head eval transform) the model's own last-block [CLS]→patch attention
(mean over heads, or one head) ranks the patches by saliency. At information-loss ratio ``r``:

- ``salient``: drop the most-attended patches whose cumulative attention mass reaches ``r``
  (patch p is dropped iff the mass of the patches ranked above it is < r);
- ``nonsalient``: keep exactly the patches ``salient`` would drop at ``1 - r`` and drop the rest
  (so at 0.5 the dropped/kept sets are complementary). These are the sets of iBOT's
  ``analysis/occlusion/eval.py`` (``--dino``; its key for non-salient is the *kept* mass
  ``λ = 1 - r``, equal at 0.5);
- ``random``: drop ``round(r · N)`` patches chosen at random (nested sets across ratios).

``drop: tokens`` (default) removes the dropped patch tokens from the sequence after patch +
position embedding, [CLS] always kept (r = 1: the prediction comes from [CLS] alone). ``drop:
zero_pixels`` zeroes those image patches instead (normalised input = 0), as the official script
does. Patch shuffle: the crop is cut into ``g × g`` tiles (``crop / g`` px) that are randomly
permuted, for every grid size ``g`` in 2..16 dividing the crop (``shuffle_grid_sizes: auto``).
Randomness is per image (seed, image index), independent of batching and of the process count.

Outputs beside metrics.json: ``curves.csv`` (mode, ratio, top-1, mean fraction of patches
dropped), ``shuffle.csv`` and ``occlusion.png``. Metrics (percent): ``clean_top1``,
``salient_0.5``, ``nonsalient_0.5``, ``random_0.5``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from downstream.features import log
from downstream.cli import stage_main
from downstream.robustness.common import (LabelledImages, LinearProbeModel, RobustnessError, accumulate,
                                          common_extra, folder_samples, head_class_index, percent, prepare,
                                          shard_loader, robustness_protocol, write_csv, write_robustness_metrics)
from ibot.distributed import barrier, init_distributed, is_main
from ibot.io import atomic_write
from ibot.stages import stage_defaults

__all__ = ["DEFAULTS", "MODES", "REPORTED_RATIO", "saliency", "salient_drop", "nonsalient_drop", "random_drop",
           "shuffle_patches", "zero_patches", "grid_sizes", "logits_from_kept_tokens", "run", "main"]

MODES: tuple[str, ...] = ("salient", "nonsalient", "random")
REPORTED_RATIO = 0.5
_SALT = {"random": 1, "shuffle": 2}

#: Defaults: workflow/schemas/robustness.schema.yaml (occlusion), the one source.
DEFAULTS: dict[str, Any] = stage_defaults("occlusion")


def protocol_label(config: Mapping[str, Any], head_meta: Mapping[str, Any]) -> str:
    """The head's protocol plus how patches are occluded and ranked: this implementation drops tokens
    (or zeroes pixels) ranked by the evaluated model's own [CLS] attention, which is not the paper's
    protocol (a separate DINO ViT-S/16's saliency, zeroed pixels), so it never joins the paper's numbers."""
    heads = config["attention_heads"]
    return f"{robustness_protocol(head_meta)},occlusion(drop={config['drop']},saliency=self-attention-{heads})"


# -- patch selection -------------------------------------------------------------------------------
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


def random_drop(num_patches: int, ratio: float, indices: Tensor, seed: int) -> Tensor:
    """Bool [B, N]: ``round(ratio · N)`` random patches per image (per-image permutation, nested in ratio)."""
    count = min(num_patches, max(0, round(ratio * num_patches)))
    drop = torch.zeros(len(indices), num_patches, dtype=torch.bool)
    for row, index in enumerate(indices.tolist()):
        drop[row, torch.randperm(num_patches, generator=_generator(seed, _SALT["random"], index))[:count]] = True
    return drop


def shuffle_patches(images: Tensor, grid: int, indices: Tensor, seed: int) -> Tensor:
    """Cut each image into ``grid × grid`` tiles and permute them (per-image permutation)."""
    batch, channels, height, width = images.shape
    if height % grid or width % grid:
        raise RobustnessError(f"patch shuffle: grid {grid} does not divide the {height}x{width} crop")
    th, tw = height // grid, width // grid
    tiles = images.reshape(batch, channels, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(
        batch, grid * grid, channels, th, tw)
    perms = torch.stack([torch.randperm(grid * grid, generator=_generator(seed, _SALT["shuffle"] + grid, i))
                         for i in indices.tolist()]).to(images.device)
    tiles = torch.gather(tiles, 1, perms[:, :, None, None, None].expand_as(tiles))
    return tiles.reshape(batch, grid, grid, channels, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(
        batch, channels, height, width)


def zero_patches(images: Tensor, drop: Tensor, patch_size: int) -> Tensor:
    """Zero (in normalised space) the image patches flagged in ``drop`` [B, N]."""
    batch, _, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    mask = drop.reshape(batch, 1, grid_h, grid_w).to(images.dtype)
    mask = mask.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return images * (1.0 - mask.to(images.device))


def grid_sizes(setting: str | Sequence[int], crop: int) -> list[int]:
    if setting == "auto":
        return [g for g in range(2, 17) if crop % g == 0]
    sizes = [int(g) for g in setting]
    bad = [g for g in sizes if g < 1 or crop % g]
    if bad:
        raise RobustnessError(f"occlusion.shuffle_grid_sizes: {bad} do not divide the crop ({crop} px)")
    return sizes


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


def logits_from_kept_tokens(model: LinearProbeModel, images: Tensor, keep: Tensor) -> Tensor:
    """Logits when only the patch tokens with ``keep`` [B, N] (bool) enter the transformer.

    Dropped tokens are *removed* from the sequence after patch + position embedding ([CLS] always
    stays), as in Naseer et al. (2021). Images with different kept counts share a batch: kept
    tokens are packed first, padding keys are masked out of every attention, and padded positions
    of the block outputs are set to the mean of the kept patch tokens (the [CLS] output when none
    is kept) so that any patch-average in the feature function sees exactly the kept tokens. The
    features are assembled by the linear stage's own feature function (``model.feature_fn``), so
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
    features = model.feature_fn(_PrecomputedLayers(backbone, outputs), images, model.n_last_blocks, model.avgpool)
    return model.linear(features.float())


# -- stage -----------------------------------------------------------------------------------------
def _drop_logits(net: LinearProbeModel, images: Tensor, drop: Tensor, mode: str) -> Tensor:
    if mode == "tokens":
        return logits_from_kept_tokens(net, images, ~drop.to(images.device))
    return net(zero_patches(images, drop.to(images.device), int(net.backbone.patch_size)))


def _plot(path: Path, ratios: list[float], curves: dict[str, list[float]], clean: float,
          shuffle: list[tuple[int, float]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, values in curves.items():
        axes[0].plot(ratios, values, marker="o", label=f"{mode} drop")
    axes[0].axhline(clean, color="grey", linestyle="--", linewidth=1, label="clean")
    axes[0].set_xlabel("information loss ratio")
    axes[0].set_ylabel("top-1 (%)")
    axes[0].set_title("patch drop")
    axes[0].legend()
    if shuffle:
        axes[1].plot([g * g for g, _ in shuffle], [v for _, v in shuffle], marker="o")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xticks([g * g for g, _ in shuffle], [f"{g}x{g}" for g, _ in shuffle])
    axes[1].axhline(clean, color="grey", linestyle="--", linewidth=1)
    axes[1].set_xlabel("shuffle grid")
    axes[1].set_ylabel("top-1 (%)")
    axes[1].set_title("patch shuffle")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, dpi=100, format="png")
    plt.close(fig)


def run(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
        checkpoint_key: str | None, data: str, out: str, run: str, model: str, seed: int,
        head: str) -> dict[str, float]:
    init_distributed()
    started = time.time()
    modes = list(config["modes"])
    unknown = [m for m in modes if m not in MODES]
    if unknown or config["drop"] not in ("tokens", "zero_pixels"):
        raise RobustnessError(f"occlusion: modes {modes} must be among {list(MODES)}, drop {config['drop']!r} one of "
                              f"'tokens', 'zero_pixels'")
    ratios = sorted({float(r) for r in config["ratios"]} | {REPORTED_RATIO})
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise RobustnessError(f"occlusion.ratios: {ratios} must lie in [0, 1]")
    net, transform, sizes, device = prepare(config, model_spec, checkpoint, checkpoint_key, head, seed)
    crop, patch = sizes["crop"], int(net.backbone.patch_size)
    if crop % patch:
        raise RobustnessError(f"occlusion: crop {crop} px is not a multiple of the patch size {patch}")
    num_patches = (crop // patch) ** 2
    grids = grid_sizes(config["shuffle_grid_sizes"], crop)
    folder = Path(data) / config["split"]
    dataset = LabelledImages(folder_samples(folder, head_class_index(net.classes), what=f"ImageNet {folder}",
                                            max_per_class=config["max_images_per_class"]), transform)
    log(f"[occlusion] {len(dataset)} images, {num_patches} patches, modes {modes} x {len(ratios)} ratios, "
        f"shuffle grids {grids}, drop={config['drop']}, device {device}")
    n_ratios = len(ratios)

    def step(images, targets, indices):
        result = {"total": torch.tensor([len(targets)]), "clean": net(images).argmax(-1).eq(targets).sum().reshape(1)}
        sal = saliency(net.backbone, images, config["attention_heads"]) if {"salient", "nonsalient"} & set(modes) \
            else None
        for mode in modes:
            correct = torch.zeros(n_ratios, dtype=torch.float64, device=images.device)
            dropped = torch.zeros(n_ratios, dtype=torch.float64, device=images.device)
            for i, ratio in enumerate(ratios):
                if mode == "salient":
                    drop = salient_drop(sal, ratio)
                elif mode == "nonsalient":
                    drop = nonsalient_drop(sal, ratio)
                else:
                    drop = random_drop(num_patches, ratio, indices, seed)
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

    metrics: dict[str, float] = {}
    if is_main():
        total = counts["total"][0]
        clean = percent(counts["clean"][0], total)
        metrics["clean_top1"] = clean
        rows, curves = [], {}
        for mode in modes:
            curves[mode] = [percent(c, total) for c in counts[f"{mode}/correct"]]
            for i, ratio in enumerate(ratios):
                rows.append({"mode": mode, "ratio": ratio, "top1": round(curves[mode][i], 4),
                             "dropped_patch_fraction": round(float(counts[f"{mode}/dropped"][i] / total), 6),
                             "ratio_definition": "patch fraction" if mode == "random" else "attention mass"})
            metrics[f"{mode}_{REPORTED_RATIO}"] = curves[mode][ratios.index(REPORTED_RATIO)]
        shuffle = [(g, percent(counts["shuffle"][i], total)) for i, g in enumerate(grids)]
        out_dir = Path(out).parent
        write_csv(out_dir / "curves.csv", rows, ["mode", "ratio", "top1", "dropped_patch_fraction", "ratio_definition"])
        write_csv(out_dir / "shuffle.csv", [{"grid": g, "tile_px": crop // g, "top1": round(v, 4)} for g, v in shuffle],
                  ["grid", "tile_px", "top1"])
        _plot(out_dir / "occlusion.png", ratios, curves, clean, shuffle, f"{model}: occlusion ({config['drop']})")
        extra = common_extra(net, sizes, device)
        extra.update({
            "num_images": int(total), "num_patches": num_patches, "ratios": ratios, "curves": curves,
            "shuffle": {str(g): v for g, v in shuffle}, "drop": config["drop"],
            "saliency": f"model's own last-block [CLS] attention ({config['attention_heads']} head(s))",
            "ratio_definition": "salient/nonsalient: attention mass dropped; random: fraction of patches dropped",
            "outputs": ["curves.csv", "shuffle.csv", "occlusion.png"],
        })
        write_robustness_metrics(out, run=run, model=model, stage="occlusion", dataset="imagenet-val",
                                 metrics=metrics, config=config, started=started, checkpoint=checkpoint, extra=extra,
                                 head_meta=net.head.meta, protocol=protocol_label(config, net.head.meta))
    barrier()
    return metrics


def main(argv: Sequence[str] | None = None) -> Any:
    return stage_main("occlusion", "downstream.robustness.occlusion:run", DEFAULTS, argv,
                     description="Occlusion (salient / non-salient / random patch drop) and patch shuffle "
                                 "robustness of backbone + linear head.")


if __name__ == "__main__":
    main()
