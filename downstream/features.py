"""Shared pieces of the ImageNet classification evaluations (k-NN, linear probing, fine-tuning).

- the official evaluation transforms (``Resize(resize, bicubic)`` + ``CenterCrop(crop)`` +
  ImageNet normalisation; ``RandomResizedCrop`` + flip for linear-probe training);
- ``ImageFolder`` datasets that also return the sample index (so features gathered from a padded
  ``DistributedSampler`` can be de-duplicated);
- data loaders that are DDP-aware (``DistributedSampler`` when ``world_size() > 1``);
- feature extraction gathered across processes (:func:`extract_features`);
- per-sample top-k correctness gathered across processes (:func:`gather_correct`), so validation
  accuracies are exact under DDP (no duplicated padding samples);
- progress reporting (:func:`ibot.progress.progress`: tqdm on a terminal, a periodic line with
  ETA in log files) and precision helpers (``fp32`` / ``bf16`` / ``fp16`` autocast).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms

from ibot.distributed import all_gather_cat, is_main, local_rank, rank, world_size
from ibot.progress import progress  # re-exported: the stages' one progress helper

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "eval_transform", "linear_train_transform",
           "IndexedImageFolder", "image_folder", "make_loader", "extract_features", "gather_correct",
           "cls_features", "topk_correct", "progress", "log", "pick_device", "autocast", "PRECISIONS",
           "dataset_label", "native_img_size", "build_eval_backbone",
           "seed_everything"]

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bicubic": transforms.InterpolationMode.BICUBIC,
                  "bilinear": transforms.InterpolationMode.BILINEAR,
                  "nearest": transforms.InterpolationMode.NEAREST}
PRECISIONS = ("fp32", "bf16", "fp16")


# -- transforms --------------------------------------------------------------------------------
def eval_transform(resize: int, crop: int, interpolation: str = "bicubic") -> transforms.Compose:
    """Official evaluation transform: resize shorter side, centre crop, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(int(resize), interpolation=INTERPOLATIONS[interpolation]),
        transforms.CenterCrop(int(crop)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def linear_train_transform(crop: int, interpolation: str = "bilinear") -> transforms.Compose:
    """Official linear-probe training transform (eval_linear.py): RandomResizedCrop + flip.

    The official script calls ``RandomResizedCrop(224)`` with torchvision's default
    interpolation (bilinear); the key is configurable (``train_interpolation``).
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(int(crop), interpolation=INTERPOLATIONS[interpolation]),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# -- datasets and loaders ----------------------------------------------------------------------
class IndexedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` whose items are ``(image, label, index)``."""

    def __getitem__(self, index: int):  # type: ignore[override]
        image, label = super().__getitem__(index)
        return image, label, index


def image_folder(root: str | Path, split: str, transform: Callable | None) -> IndexedImageFolder:
    """``<root>/<split>`` as an indexed ImageFolder, with a clear error when the layout is wrong."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset {root}: no '{split}/' folder (expected the ImageNet layout "
                                f"<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG)")
    return IndexedImageFolder(str(folder), transform=transform)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                num_workers: int = 0) -> DataLoader:
    """Loader over this process's shard: ``DistributedSampler`` (which pads) when ``world_size() > 1``.

    With one process and ``shuffle`` it still uses a (1-replica) DistributedSampler so the order of
    epoch ``e`` depends only on ``(seed, e)`` (call ``loader.sampler.set_epoch(e)``): a resumed run
    sees the same data order as an uninterrupted one.
    """
    sampler = None
    if world_size() > 1 or shuffle:
        sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                                     drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


# -- features ----------------------------------------------------------------------------------
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


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int]) -> Tensor:
    """[B, len(ks)] bool: is the target among the top-k predictions (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hits = top.eq(targets.view(-1, 1))
    return torch.stack([hits[:, :min(k, kmax)].any(dim=1) for k in ks], dim=1)


def gather_correct(correct: Tensor, index: Tensor, num_samples: int) -> Tensor:
    """Gather per-sample results ``[B, ...]`` from every rank and de-duplicate by sample index.

    Returns ``[num_samples, ...]`` (float) in dataset order; exact under a padding DistributedSampler.
    """
    correct = all_gather_cat(correct.float().contiguous())
    index = all_gather_cat(index.to(correct.device))
    out = torch.full((num_samples, *correct.shape[1:]), float("nan"), device=correct.device)
    out.index_copy_(0, index, correct)
    return out


# -- runtime helpers ---------------------------------------------------------------------------
def pick_device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def autocast(precision: str, device: torch.device):
    """Autocast context for ``precision`` (``fp32``: none; ``fp16`` falls back to fp32 on CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def log(message: str) -> None:
    """One line to stdout from the main process (the launcher streams it to the Snakemake log)."""
    if is_main():
        print(message, flush=True)


def dataset_label(data: str | Path, num_classes: int) -> str:
    """``imagenet-1k`` for a 1000-class ImageNet folder, else the data folder's name."""
    return "imagenet-1k" if num_classes == 1000 else Path(data).resolve().name


def native_img_size(checkpoint: str | Path | None, checkpoint_key: str | None, patch_size: int,
                    default: int) -> int:
    """Image size whose patch grid equals the checkpoint's ``pos_embed`` grid (``default`` if none).

    Building the backbone at its native size loads the weights unchanged; other crop sizes are then
    handled at run time by the backbone's (official, bicubic) positional-embedding interpolation,
    as in the official evaluation scripts.
    """
    if checkpoint is None:
        return default
    from ibot.checkpoint import extract_backbone_state, load_file
    state = extract_backbone_state(load_file(checkpoint), checkpoint_key, source=f"checkpoint {checkpoint}")
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3:
        return default
    side = math.isqrt(pos.shape[1] - 1)
    return side * patch_size if side * side == pos.shape[1] - 1 else default


def build_eval_backbone(model_spec: Mapping[str, Any], checkpoint: str | Path | None,
                        checkpoint_key: str | None, default_img_size: int) -> nn.Module:
    """Frozen evaluation backbone (eval mode, no grad) built at the checkpoint's native size."""
    from ibot.models.pretrained import build_pretrained_backbone
    img_size = native_img_size(checkpoint, checkpoint_key, int(model_spec.get("patch_size", 16)), default_img_size)
    backbone = build_pretrained_backbone(model_spec, checkpoint, checkpoint_key=checkpoint_key, img_size=img_size)
    backbone.eval()
    for param in backbone.parameters():
        param.requires_grad_(False)
    return backbone
