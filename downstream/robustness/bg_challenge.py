"""Backgrounds challenge / ImageNet-9 (Xiao et al., ICLR 2021): top-1 per background variant.

Layout ``<root>/<variant>/val/<k>_<name>/*`` (``k`` = ImageNet-9 class index) for the variants
original, only_fg, mixed_same, mixed_rand, mixed_next, no_fg, only_bg_b, only_bg_t, plus
``<root>/in_to_in9.json`` = ``{head class index (str): IN-9 index or -1}`` (the real file maps
the 1000 ImageNet classes; the embedded generator writes it for its own classes).

Scoring follows the official code (MadryLab/backgrounds_challenge ``tools/model_utils.eval_model``,
copied by iBOT): the prediction is the argmax over *all* head classes, then mapped to its IN-9
super-class; a class mapped to -1 is always wrong. Transform: centre crop only by default
(the official evaluation applies ``ToTensor`` to the stored 224 px images), ImageNet normalisation.

Metrics (percent): top-1 per variant, named by the variant (``original``, ``only_fg``, ...,
``only_bg_t``), and ``bg_gap`` = mixed_same - mixed_rand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from downstream.engine.setup import log
from downstream.robustness.common import (LabelledImages, RobustnessError, accumulate, class_folders, common_extra,
                                          folder_samples, percent, prepare, shard_loader, write_robustness_metrics)
from ibot.data.imagenet9 import IN9_CLASSES, IN9_VARIANTS
from ibot.distributed import is_main
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_evidence, baseline

__all__ = ["VARIANTS", "NUM_IN9", "load_in9_map", "map_to_in9", "in9_label", "run"]

VARIANTS: tuple[str, ...] = IN9_VARIANTS  # the one list: ibot.data.imagenet9
NUM_IN9 = len(IN9_CLASSES)
_FOLDER = re.compile(r"^(\d+)_")


def load_in9_map(path: str | Path, num_classes: int) -> Tensor:
    """``in_to_in9.json`` as a lookup tensor [num_classes] (IN-9 index or -1) over the head's outputs."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RobustnessError(f"ImageNet-9 class map {path}: cannot be read: {error}") from error
    if not isinstance(mapping, dict):
        raise RobustnessError(f"ImageNet-9 class map {path}: expected a JSON object {{class index: in9 index}}")
    missing = [i for i in range(num_classes) if str(i) not in mapping]
    if missing:
        raise RobustnessError(f"ImageNet-9 class map {path}: no entry for head classes {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''} (the head has {num_classes} outputs, the map "
                              f"{len(mapping)} entries); was the head trained on the classes the map is for?")
    lut = torch.tensor([int(mapping[str(i)]) for i in range(num_classes)], dtype=torch.long)
    if bool(((lut < -1) | (lut >= NUM_IN9)).any()):
        raise RobustnessError(f"ImageNet-9 class map {path}: values must be -1 or 0..{NUM_IN9 - 1}")
    return lut


def map_to_in9(logits: Tensor, lut: Tensor) -> Tensor:
    """IN-9 prediction: argmax over all classes, then the class → super-class map (-1: none)."""
    return lut.to(logits.device)[logits.argmax(dim=-1)]


def in9_label(folder: str) -> int:
    match = _FOLDER.match(folder)
    if not match or not 0 <= int(match.group(1)) < NUM_IN9:
        raise RobustnessError(f"ImageNet-9 class folder {folder!r}: expected '<k>_<name>' with k in 0..{NUM_IN9 - 1}")
    return int(match.group(1))


def _samples(root: Path, variants: Sequence[str], max_per_class: int | None) -> list[tuple[str, int, int]]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise RobustnessError(f"bg_challenge.variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    missing = [v for v in variants if not (root / v / "val").is_dir()]
    if missing:
        raise RobustnessError(f"ImageNet-9 {root}: missing variant folders {[f'{v}/val' for v in missing]}")
    samples = []
    for group, variant in enumerate(variants):
        folder, what = root / variant / "val", f"ImageNet-9 {variant}"
        labels = {name: in9_label(name) for name in class_folders(folder, what=what)}
        samples += folder_samples(folder, labels, what=what, max_per_class=max_per_class, group=group)
    return samples


def run(ctx: StageContext) -> dict[str, float]:
    """Top-1 per ImageNet-9 variant (and the background gap), metrics.json."""
    config, root = ctx.config, ctx.data_root
    variants = list(config["variants"])
    samples = _samples(root, variants, config["max_images_per_class"])
    net, transform, sizes, device = prepare(ctx)
    mapping_file = Path(config["mapping_file"] or root / "in_to_in9.json")
    lut = load_in9_map(mapping_file, net.num_classes).to(device)
    dataset = LabelledImages(samples, transform)
    group_of = dataset.groups.to(device)
    log(f"[bg_challenge] {len(dataset)} images over {len(variants)} variants, device {device}")

    def step(images, targets, indices):
        correct = map_to_in9(net(images), lut).eq(targets)
        group = group_of[indices.to(device)]
        return {"correct": torch.bincount(group[correct], minlength=len(variants)),
                "total": torch.bincount(group, minlength=len(variants))}

    counts = accumulate(shard_loader(dataset, config["batch_size"], config["num_workers"]), step,
                        {"correct": len(variants), "total": len(variants)}, device=device, desc="bg_challenge")
    if not is_main():
        return {}
    metrics = {variant: percent(counts["correct"][index], counts["total"][index])
               for index, variant in enumerate(variants)}
    if "mixed_same" in variants and "mixed_rand" in variants:
        metrics["bg_gap"] = metrics["mixed_same"] - metrics["mixed_rand"]
    extra = common_extra(net, sizes, device)
    extra.update({
        "num_images": {v: int(counts["total"][i]) for i, v in enumerate(variants)},
        "mapping_file": str(mapping_file), "head_classes_mapped": int((lut >= 0).sum()),
        "scoring": "argmax over all head classes, then in_to_in9 (unmapped = wrong), as the official eval_model",
        "bg_gap": "mixed_same - mixed_rand (top-1 %)",
    })
    intervals, baselines = {}, {}
    for index, variant in enumerate(variants):  # each variant's accuracy over its own images, 9 classes
        labels = dataset.labels[dataset.groups == index].numpy()
        interval, base = accuracy_evidence({variant: metrics[variant]}, labels, NUM_IN9)
        intervals.update(interval)
        baselines.update(base)
    if "bg_gap" in metrics:  # a model that ignores the background has no gap; no interval for a difference
        baselines["bg_gap"] = baseline(0.0, "a classifier that ignores the background")
    write_robustness_metrics(ctx, dataset="imagenet-9", metrics=metrics, extra=extra, head_meta=net.head.meta,
                             intervals=intervals, baselines=baselines)
    return metrics
