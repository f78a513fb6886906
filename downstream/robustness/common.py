"""Shared machinery of the robustness stages: model = frozen backbone + the linear-probe head.

The linear-probing stage saves its best head as ``results/<run>/<model>/linear/head.pth``::

    {'state_dict': {'weight': [C, F], 'bias': [C]},
     'meta': {'n_last_blocks', 'avgpool_patchtokens', 'num_classes', 'classes': [wnid, ...],
              'resize', 'crop', 'lr', 'epoch', ...}}

:func:`load_model` rebuilds the classifier with the linear stage's own loader
(``downstream.linear.load_linear_classifier``) and exposes the pieces the occlusion stage needs:
the backbone, the ``nn.Linear`` head and the feature function (``downstream.linear.linear_features``).
Features computed from a *reduced token sequence* (:func:`logits_from_kept_tokens`) are assembled
by that same feature function, so they match the head's training features exactly.

Also here: the evaluation transform (head meta ``resize``/``crop``, bicubic, ImageNet
normalisation), folder datasets with a wnid → head-class remap, an exact count-based eval loop
(sharded without padding under DDP, counts summed across processes) and the metrics writer call.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from downstream.features import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, eval_transform, log, pick_device, progress
from ibot.checkpoint import CheckpointError, load_file, sha256_file
from ibot.distributed import all_reduce_sum, rank, world_size
from ibot.io import write_csv_atomic
from ibot.metrics import write_metrics

__all__ = ["RobustnessError", "HEAD_META_KEYS", "IMAGE_SUFFIXES", "HeadSpec", "read_head",
           "LinearProbeModel", "load_model", "logits_from_kept_tokens",
           "robustness_transform", "LabelledImages", "list_images", "class_folders", "folder_samples",
           "head_class_index", "shard_loader", "accumulate", "percent", "write_csv", "write_robustness_metrics",
           "common_extra"]

HEAD_META_KEYS = ("n_last_blocks", "avgpool_patchtokens", "classes", "resize", "crop")
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})


class RobustnessError(ValueError):
    """A robustness input (head, dataset layout, class mapping) that cannot be used as asked."""


# -- the linear head -----------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    weight: Tensor
    bias: Tensor
    meta: dict[str, Any]
    path: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


def read_head(path: str | Path) -> HeadSpec:
    """Load and check ``head.pth`` (the linear-probing stage's best head)."""
    try:
        obj = load_file(path)
    except CheckpointError as error:
        raise RobustnessError(f"linear head {path}: {error}") from error
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping) \
            or not isinstance(obj.get("meta"), Mapping):
        raise RobustnessError(f"linear head {path}: expected {{'state_dict': {{weight, bias}}, 'meta': {{...}}}} "
                              f"as written by the linear stage; got keys "
                              f"{sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__}")
    state, meta = obj["state_dict"], dict(obj["meta"])
    missing = [k for k in ("weight", "bias") if k not in state] + [k for k in HEAD_META_KEYS if k not in meta]
    if missing:
        raise RobustnessError(f"linear head {path}: missing {missing} (state_dict keys {sorted(state)}, "
                              f"meta keys {sorted(meta)})")
    weight, bias = state["weight"], state["bias"]
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise RobustnessError(f"linear head {path}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} "
                              f"are not a linear layer")
    classes = list(meta["classes"])
    if len(classes) != weight.shape[0] or int(meta.get("num_classes", len(classes))) != weight.shape[0]:
        raise RobustnessError(f"linear head {path}: {weight.shape[0]} outputs but meta lists {len(classes)} classes "
                              f"(num_classes {meta.get('num_classes')})")
    if len(set(classes)) != len(classes):
        raise RobustnessError(f"linear head {path}: duplicate class names in meta['classes']")
    return HeadSpec(weight=weight.float(), bias=bias.float(), meta=meta, path=str(path))


class LinearProbeModel(nn.Module):
    """images → logits of the linear probe (``downstream.linear.LinearClassifier``), plus the pieces
    the occlusion stage needs to run it on reduced token sets (backbone, linear layer, feature fn)."""

    def __init__(self, classifier: nn.Module, head: HeadSpec, feature_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.classifier = classifier
        self.head = head
        self.feature_fn = feature_fn
        self.n_last_blocks = int(classifier.n_last_blocks)
        self.avgpool = classifier.avgpool_patchtokens

    @property
    def backbone(self) -> nn.Module:
        return self.classifier.backbone

    @property
    def linear(self) -> nn.Linear:
        return self.classifier.linear

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images)


def load_model(model_spec: Mapping[str, Any], checkpoint: str | None, checkpoint_key: str | None,
               head_path: str | Path, *, device: torch.device, seed: int = 0) -> LinearProbeModel:
    """The evaluated model: backbone (``checkpoint``) + linear head (``head_path``), eval mode, frozen,
    built by ``downstream.linear.load_linear_classifier`` (the linear stage's own loader)."""
    from downstream import linear

    head = read_head(head_path)
    torch.manual_seed(seed)  # a random-init backbone (no checkpoint) is then reproducible
    try:
        classifier = linear.load_linear_classifier(dict(model_spec), checkpoint, checkpoint_key, str(head_path))
    except CheckpointError as error:
        raise RobustnessError(str(error)) from error
    model = LinearProbeModel(classifier, head, linear.linear_features)
    if len(model.backbone.blocks) < model.n_last_blocks:
        raise RobustnessError(f"linear head {head_path}: n_last_blocks {model.n_last_blocks} does not fit a backbone "
                              f"of depth {len(model.backbone.blocks)}")
    model.eval().requires_grad_(False)
    return model.to(device)


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
    is kept) so that any patch-average in the feature function sees exactly the kept tokens.
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


# -- data ----------------------------------------------------------------------------------------
class _UpscaleToAtLeast:
    """Resize (bicubic) so the shorter side is at least ``size``; no-op for large-enough images."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image):
        if min(image.size) >= self.size:
            return image
        return transforms.functional.resize(image, self.size, interpolation=INTERPOLATIONS["bicubic"])


def robustness_transform(config: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[Callable, dict[str, Any]]:
    """The eval transform and its resolved sizes.

    ``crop``: ``"head"`` (the linear head's eval crop) or pixels. ``resize``: ``"head"`` (the head's
    eval resize), pixels, or ``"none"``/null: no resize, only the centre crop (the official
    ImageNet-C / backgrounds-challenge evaluation, whose images are stored at the crop size;
    smaller images are upscaled to the crop first). Bicubic, ImageNet mean/std.
    """
    crop = int(meta["crop"]) if config["crop"] == "head" else int(config["crop"])
    resize_cfg = config["resize"]
    if resize_cfg == "head":
        resize: int | None = int(meta["resize"])
    elif resize_cfg in (None, "none"):
        resize = None
    else:
        resize = int(resize_cfg)
    if resize is not None:
        return eval_transform(resize, crop, "bicubic"), {"resize": resize, "crop": crop}
    transform = transforms.Compose([_UpscaleToAtLeast(crop), transforms.CenterCrop(crop), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return transform, {"resize": None, "crop": crop}


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_images(folder: str | Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and _is_image(e.name))


def class_folders(folder: str | Path, *, what: str) -> list[str]:
    """Sorted, non-hidden sub-folder names of ``folder`` (clear error when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RobustnessError(f"{what}: {folder} is not a directory")
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise RobustnessError(f"{what}: {folder} has no class folders")
    return names


def folder_samples(folder: str | Path, labels: Mapping[str, int], *, what: str,
                   max_per_class: int | None = None, group: int = 0) -> list[tuple[str, int, int]]:
    """``(path, label, group)`` for ``<folder>/<class>/<image>``; every class folder must be in ``labels``."""
    names = class_folders(folder, what=what)
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise RobustnessError(f"{what}: class folders {unknown[:10]}{' ...' if len(unknown) > 10 else ''} in "
                              f"{folder} are unknown to the linear head ({len(labels)} classes)")
    samples = []
    for name in names:
        images = list_images(Path(folder) / name)
        if max_per_class is not None:
            images = images[:int(max_per_class)]
        samples.extend((path, labels[name], group) for path in images)
    if not samples:
        raise RobustnessError(f"{what}: no images under {folder}")
    return samples


def head_class_index(classes: Sequence[str]) -> dict[str, int]:
    return {wnid: index for index, wnid in enumerate(classes)}


class LabelledImages(Dataset):
    """``(image, label, index)`` items; ``groups[index]`` tells which sub-benchmark a sample is in."""

    def __init__(self, samples: Sequence[tuple[str, int, int]], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.labels = torch.tensor([s[1] for s in self.samples], dtype=torch.long)
        self.groups = torch.tensor([s[2] for s in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image
        path, label, _ = self.samples[index]
        with open(path, "rb") as handle:
            image = Image.open(handle).convert("RGB")
        return self.transform(image), label, index


# -- evaluation ----------------------------------------------------------------------------------
def shard_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """This process's shard ``rank::world_size`` (no padding, so summed counts are exact)."""
    shard = Subset(dataset, range(rank(), len(dataset), world_size())) if world_size() > 1 else dataset
    return DataLoader(shard, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


@torch.inference_mode()
def accumulate(loader: Iterable, step: Callable[[Tensor, Tensor, Tensor], Mapping[str, Tensor]],
               zeros: Mapping[str, Sequence[int] | int], *, device: torch.device, desc: str) -> dict[str, Tensor]:
    """Sum ``step(images, labels, indices)`` outputs over the loader and over processes.

    ``zeros`` gives every key's shape (a process with an empty shard still joins the reduction).
    Returns float64 CPU tensors.
    """
    totals = {key: torch.zeros(shape, dtype=torch.float64, device=device) for key, shape in zeros.items()}
    for images, labels, indices in progress(loader, desc=desc):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        for key, value in step(images, labels, indices).items():
            totals[key] += value.to(device=device, dtype=torch.float64)
    return {key: all_reduce_sum(value).cpu() for key, value in totals.items()}


def percent(correct: float | Tensor, total: float | Tensor) -> float:
    correct, total = float(correct), float(total)
    return 100.0 * correct / total if total else math.nan


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Atomic CSV write (header ``columns``)."""
    write_csv_atomic(path, rows, columns)


def common_extra(model: LinearProbeModel, sizes: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    head = model.head
    keep = ("n_last_blocks", "avgpool_patchtokens", "num_classes", "lr", "epoch", "resize", "crop")
    return {
        "head": {"path": head.path, "sha256": sha256_file(head.path),
                 "meta": {k: head.meta[k] for k in keep if k in head.meta}},
        "model": "downstream.linear.load_linear_classifier", "transform": dict(sizes), "device": str(device),
        "world_size": world_size(), "units": "percent",
    }


def write_robustness_metrics(out: str | Path, *, run: str, model: str, stage: str, dataset: str,
                             metrics: Mapping[str, float], config: Mapping[str, Any], started: float,
                             checkpoint: str | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    record = write_metrics(out, run=run, model=model, stage=stage, task="robustness", dataset=dataset,
                           protocol="linear-head", metrics=metrics, config=config,
                           wall_time_s=time.time() - started, checkpoint=checkpoint, extra=extra)
    log(f"[{stage}] " + ", ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items()))
    log(f"[{stage}] wrote {out}")
    return record


# -- stage plumbing --------------------------------------------------------------------------------
def prepare(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
            checkpoint_key: str | None, head: str, seed: int) -> tuple[LinearProbeModel, Callable, dict, torch.device]:
    """Model on the device, eval transform and its resolved sizes (call after ``init_distributed``)."""
    device = pick_device()
    model = load_model(model_spec, checkpoint, checkpoint_key, head, device=device, seed=seed)
    transform, sizes = robustness_transform(config, model.head.meta)
    return model, transform, sizes, device


def stage_cli(stage: str, entry: str, defaults: Mapping[str, Any], argv: Sequence[str] | None,
              description: str) -> Any:
    """The common stage CLI plus ``--head`` (the linear stage's ``head.pth``)."""
    from downstream.cli import stage_main
    return stage_main(stage, entry, defaults, argv, description,
                      extra_arguments=lambda parser: parser.add_argument(
                          "--head", required=True, help="linear head (head.pth) written by the linear stage"))
