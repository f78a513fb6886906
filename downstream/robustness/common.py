"""Shared machinery of the robustness stages: model = frozen backbone + the linear-probe head.

The linear-probing stage saves its best head as ``results/<run>/<model>/linear/head.pth``::

    {'state_dict': {'weight': [C, F], 'bias': [C]},
     'meta': {'n_last_blocks', 'avgpool_patchtokens', 'num_classes', 'classes': [wnid, ...],
              'resize', 'crop', 'lr', 'epoch', ...}}

:func:`load_model` rebuilds the classifier with the linear probe's own loader
(:func:`downstream.engine.linear.load_linear_classifier`) and exposes the pieces the occlusion stage
needs: the backbone, the ``nn.Linear`` head and the feature function
(:func:`downstream.engine.features.linear_features`).

Also here: the evaluation transform (head meta ``resize``/``crop``, bicubic, ImageNet
normalisation), folder datasets with a wnid → head-class remap (listed by torchvision's
``make_dataset``, image files as in :mod:`ibot.data.folders`), an exact count-based eval loop
(sharded without padding under DDP, counts summed across processes) and the metrics writer call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from torchvision.datasets.folder import make_dataset, pil_loader

from downstream.engine.data import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, eval_transform
from downstream.engine.linear import LinearClassifier, load_linear_classifier
from downstream.engine.setup import log, pick_device, progress
from ibot.checkpoint import BackboneCheckpoint, CheckpointError, sha256_file
from ibot.data import folders
from ibot.distributed import all_reduce_sum, rank, world_size
from ibot.models.specs import ModelSpec
from ibot.run.context import StageContext

__all__ = ["RobustnessError", "robustness_protocol", "load_model", "robustness_transform", "LabelledImages",
           "class_folders", "folder_samples", "head_class_index", "shard_loader", "accumulate", "percent",
           "write_robustness_metrics", "common_extra", "prepare"]


class RobustnessError(ValueError):
    """A robustness input (head, dataset layout, class mapping) that cannot be used as asked."""


# -- the model: backbone + the linear stage's head ---------------------------------------------------
def load_model(model_spec: ModelSpec, checkpoint: BackboneCheckpoint | None, head_path: str | Path, *,
               device: torch.device, seed: int = 0) -> LinearClassifier:
    """The evaluated model: backbone (``checkpoint``) + linear head (``head_path``), eval mode, frozen,
    built by :func:`downstream.engine.linear.load_linear_classifier` (the linear probe's own loader)."""
    torch.manual_seed(seed)  # a random-init backbone (no checkpoint) is then reproducible
    try:
        return load_linear_classifier(model_spec, checkpoint, head_path).to(device)
    except CheckpointError as error:
        raise RobustnessError(str(error)) from error
    except ValueError as error:  # the head's feature recipe does not fit this backbone (e.g. n_last_blocks)
        raise RobustnessError(f"linear head {head_path}: {error}") from error


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
    smaller images are upscaled to the crop first). ``interpolation`` (ImageNet-A/-R only: their
    official script resizes bilinear) or bicubic, the linear head's eval; ImageNet mean/std.
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
        interpolation = config.get("interpolation", "bicubic")
        return (eval_transform(resize, crop, interpolation),
                {"resize": resize, "crop": crop, "interpolation": interpolation})
    transform = transforms.Compose([_UpscaleToAtLeast(crop), transforms.CenterCrop(crop), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return transform, {"resize": None, "crop": crop}


def class_folders(folder: str | Path, *, what: str) -> list[str]:
    """Sorted, non-hidden sub-folder names of ``folder`` (clear error when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RobustnessError(f"{what}: {folder} is not a directory")
    names = folders.class_folders(folder)
    if not names:
        raise RobustnessError(f"{what}: {folder} has no class folders")
    return names


def folder_samples(folder: str | Path, labels: Mapping[str, int], *, what: str,
                   max_per_class: int | None = None, group: int = 0) -> list[tuple[str, int, int]]:
    """``(path, label, group)`` for the images of ``<folder>/<class>/``, classes sorted, paths sorted within a
    class (torchvision's ``make_dataset`` order); every class folder must be in ``labels`` (class → label)."""
    names = class_folders(folder, what=what)
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise RobustnessError(f"{what}: class folders {unknown[:10]}{' ...' if len(unknown) > 10 else ''} in "
                              f"{folder} are unknown to the linear head ({len(labels)} classes)")
    samples = []
    for name in names:
        found = make_dataset(str(folder), {name: labels[name]}, is_valid_file=folders.is_image_file, allow_empty=True)
        if max_per_class is not None:
            found = found[:int(max_per_class)]
        samples.extend((path, label, group) for path, label in found)
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
        path, label, _ = self.samples[index]
        return self.transform(pil_loader(path)), label, index


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


def common_extra(model: LinearClassifier, sizes: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    head = model.head
    keep = ("n_last_blocks", "avgpool_patchtokens", "num_classes", "lr", "epoch", "resize", "crop")
    return {
        "head": {"path": head.path, "sha256": sha256_file(head.path),
                 "meta": {k: head.meta[k] for k in keep if k in head.meta}},
        "model": "downstream.engine.linear.load_linear_classifier", "transform": dict(sizes), "device": str(device),
        "world_size": world_size(), "units": "percent",
    }


def robustness_protocol(head_meta: Mapping[str, Any]) -> str:
    """``linear-head[<the linear probe's protocol>]``: a robustness number is only the paper's when the
    head it evaluates was trained with the paper's linear protocol."""
    if "protocol" not in head_meta:
        raise RobustnessError("linear head: its meta has no 'protocol' (written by an older linear stage); "
                              "rerun the linear stage")
    return f"linear-head[{head_meta['protocol']}]"


def write_robustness_metrics(ctx: StageContext, *, dataset: str, metrics: Mapping[str, float],
                             extra: Mapping[str, Any], head_meta: Mapping[str, Any],
                             protocol: str | None = None, intervals: Mapping[str, Any] | None = None,
                             baselines: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Write a robustness stage's metrics file; the protocol names the linear head's (or ``protocol``)."""
    log(f"[{ctx.stage}] " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return ctx.write_metrics(task="robustness", dataset=dataset, protocol=protocol or robustness_protocol(head_meta),
                             metrics=metrics, extra=extra, intervals=intervals, baselines=baselines)


def prepare(ctx: StageContext) -> tuple[LinearClassifier, Callable, dict, torch.device]:
    """Model on the device (the backbone + the linear stage's head), eval transform and its resolved sizes."""
    device = pick_device()
    model = load_model(ctx.model, ctx.checkpoint, ctx.inputs["head"], device=device, seed=ctx.seed)
    robustness_protocol(model.head.meta)  # a head without its protocol fails before any evaluation
    transform, sizes = robustness_transform(ctx.config, model.head.meta)
    return model, transform, sizes, device
