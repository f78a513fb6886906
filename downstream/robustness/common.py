"""Shared machinery of the robustness stages: model = frozen backbone + the linear-probe head.

The linear-probing stage saves its best head as ``results/<run>/<model>/linear/head.pth``::

    {'state_dict': {'weight': [C, F], 'bias': [C]},
     'meta': {'n_last_blocks', 'avgpool_patchtokens', 'num_classes', 'classes': [wnid, ...],
              'resize', 'crop', 'lr', 'epoch', ...}}

:func:`load_model` rebuilds the classifier from it (``downstream.linear.load_linear_classifier``
when that module exists, else an equivalent built here) and keeps the pieces the occlusion stage
needs: the backbone, the ``nn.Linear`` head and the feature function (``linear_features`` of
``downstream.linear``; the DINO/iBOT ``eval_linear.py`` recipe as fallback). Features computed
from a *reduced token sequence* (:func:`logits_from_kept_tokens`) are assembled by that same
feature function, so they match the head's training features exactly.

Also here: the evaluation transform (head meta ``resize``/``crop``, bicubic, ImageNet
normalisation), folder datasets with a wnid → head-class remap, an exact count-based eval loop
(sharded without padding under DDP, counts summed across processes) and the metrics writer call.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
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

from downstream.features import (IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, build_eval_backbone, eval_transform,
                                 log, pick_device, progress)
from ibot.checkpoint import CheckpointError, load_file, sha256_file
from ibot.distributed import all_reduce_sum, rank, world_size
from ibot.metrics import write_metrics

__all__ = ["RobustnessError", "HEAD_META_KEYS", "IMAGE_SUFFIXES", "TRANSFORM_KEYS", "HeadSpec", "read_head",
           "default_linear_features", "LinearProbeModel", "load_model", "logits_from_kept_tokens",
           "robustness_transform", "LabelledImages", "list_images", "class_folders", "folder_samples",
           "head_class_index", "shard_loader", "accumulate", "percent", "write_csv", "write_robustness_metrics",
           "common_extra"]

HEAD_META_KEYS = ("n_last_blocks", "avgpool_patchtokens", "classes", "resize", "crop")
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})
#: Config keys every robustness stage has (see the stage DEFAULTS).
TRANSFORM_KEYS = ("resize", "crop")


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


def default_linear_features(backbone: nn.Module, images: Tensor, n_last_blocks: int,
                            avgpool_patchtokens: bool) -> Tensor:
    """The DINO/iBOT ``eval_linear.py`` feature (fallback while ``downstream.linear`` is absent):
    [CLS] of the last ``n`` blocks (after the final norm), concatenated; with ``avgpool`` the mean
    patch token of the last block is interleaved exactly as the official code does."""
    intermediate = backbone.get_intermediate_layers(images, n_last_blocks)
    output = torch.cat([x[:, 0] for x in intermediate], dim=-1)
    if avgpool_patchtokens:
        output = torch.cat((output.unsqueeze(-1), torch.mean(intermediate[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1)
        output = output.reshape(output.shape[0], -1)
    return output


def _linear_module():
    """``downstream.linear`` if it exists (import errors inside it propagate), else None."""
    if importlib.util.find_spec("downstream.linear") is None:
        return None
    return importlib.import_module("downstream.linear")


class LinearProbeModel(nn.Module):
    """images → logits of the linear probe, plus the pieces needed to run it on reduced token sets."""

    def __init__(self, backbone: nn.Module, head: HeadSpec, feature_fn: Callable[..., Tensor],
                 classifier: nn.Module | None = None, source: str = "fallback") -> None:
        super().__init__()
        self.backbone = backbone
        self.linear = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        self.linear.load_state_dict({"weight": head.weight, "bias": head.bias})
        self.classifier = classifier
        self.feature_fn = feature_fn
        self.head = head
        self.source = source
        self.n_last_blocks = int(head.meta["n_last_blocks"])
        self.avgpool = bool(head.meta["avgpool_patchtokens"])

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def features(self, images: Tensor) -> Tensor:
        return self.feature_fn(self.backbone, images, self.n_last_blocks, self.avgpool)

    def forward(self, images: Tensor) -> Tensor:
        if self.classifier is not None:
            return self.classifier(images)
        return self.linear(self.features(images))


def _find_backbone(module: nn.Module) -> nn.Module:
    from ibot.models.vision_transformer import IBOTVisionTransformer
    found = [m for m in module.modules() if isinstance(m, IBOTVisionTransformer)]
    if len(found) != 1:
        raise RobustnessError(f"downstream.linear.load_linear_classifier returned a {type(module).__name__} with "
                              f"{len(found)} ViT backbones; the robustness stages need exactly one")
    return found[0]


def load_model(model_spec: Mapping[str, Any], checkpoint: str | None, checkpoint_key: str | None,
               head_path: str | Path, *, device: torch.device, seed: int = 0) -> LinearProbeModel:
    """The evaluated model: backbone (``checkpoint``) + linear head (``head_path``), eval mode, frozen."""
    head = read_head(head_path)
    torch.manual_seed(seed)  # a random-init backbone (no checkpoint) is then reproducible
    linear = _linear_module()
    if linear is not None:
        classifier = linear.load_linear_classifier(dict(model_spec), checkpoint, checkpoint_key, str(head_path))
        model = LinearProbeModel(_find_backbone(classifier), head, linear.linear_features, classifier=classifier,
                                 source="downstream.linear")
    else:
        backbone = build_eval_backbone(model_spec, checkpoint, checkpoint_key, int(head.meta["crop"]))
        model = LinearProbeModel(backbone, head, default_linear_features, source="fallback (eval_linear.py recipe)")
    embed_dim = int(model.backbone.embed_dim)
    expected = embed_dim * (model.n_last_blocks + int(model.avgpool))
    if head.weight.shape[1] != expected:
        raise RobustnessError(
            f"linear head {head_path}: input dim {head.weight.shape[1]} does not match the backbone "
            f"({model_spec.get('arch')}, embed_dim {embed_dim}, n_last_blocks {model.n_last_blocks}, "
            f"avgpool {model.avgpool} → {expected}); was the head trained on another model?")
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
    return model.linear(features)


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in columns})
    os.replace(tmp, path)


def common_extra(model: LinearProbeModel, sizes: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    head = model.head
    keep = ("n_last_blocks", "avgpool_patchtokens", "num_classes", "lr", "epoch", "resize", "crop")
    return {
        "head": {"path": head.path, "sha256": sha256_file(head.path),
                 "meta": {k: head.meta[k] for k in keep if k in head.meta}},
        "model_source": model.source, "transform": dict(sizes), "device": str(device),
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
