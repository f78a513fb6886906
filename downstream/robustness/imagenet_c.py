"""ImageNet-C (Hendrycks & Dietterich, ICLR 2019): top-1 under 19 corruptions x 5 severities.

Layout ``<root>/<corruption>/<severity 1-5>/<wnid>/*``. Labels come from the linear head's
``classes`` (wnid list). Transform: centre crop only by default (``resize: none``), like the
official evaluation (hendrycks/robustness ``ImageNet-C/test.py``, copied by iBOT's
``analysis/corruptions_surf_variations/eval.py``): the images are stored at 224 px already.

Metrics (percent; error = 100 - top-1):

- ``mean_error_19``: *unnormalised* mean top-1 error over the 15 benchmark + 4 extra corruptions
  (speckle_noise, gaussian_blur, spatter, saturate) and 5 severities. This is the number iBOT's
  Tab. 8 calls "mCE" (48.1 for ViT-S/16; reference note R3).
- ``mean_error_15``: the same over the 15 benchmark corruptions.
- ``mCE_alexnet_15``: the standard AlexNet-normalised mCE: mean over the 15 of
  ``CE_c = mean_s E_{s,c} / E^AlexNet_c`` (AlexNet errors averaged over severities, as published).
- With corruptions or severities missing (``allow_missing``) or not configured, only
  ``mean_error_evaluated`` (and ``mCE_alexnet_evaluated`` over the evaluated benchmark corruptions
  that have all 5 severities) are written besides whichever of the above are complete;
  ``extra.missing`` lists what was skipped.

Per corruption x severity top-1: ``per_corruption.csv`` beside metrics.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from downstream.engine.setup import log
from downstream.robustness.common import (LabelledImages, RobustnessError, accumulate, common_extra,
                                          folder_samples, head_class_index, percent, prepare, shard_loader,
                                          write_robustness_metrics)
from ibot.data.corruptions import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS
from ibot.distributed import is_main
from ibot.io import write_csv_atomic
from ibot.run.context import StageContext
from ibot.uncertainty import baseline, wilson

__all__ = ["ALL_CORRUPTIONS", "ALEXNET_ERRORS", "SEVERITIES", "summarise", "run"]

ALL_CORRUPTIONS: tuple[str, ...] = tuple(BENCHMARK_CORRUPTIONS) + tuple(EXTRA_CORRUPTIONS)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

#: AlexNet top-1 errors averaged over the 5 severities (hendrycks/robustness, ImageNet-C/test.py).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}


def summarise(errors: Mapping[str, Mapping[int, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Summary metrics (percent) from top-1 *errors* in [0, 1] per corruption and severity.

    Returns ``(metrics, per_corruption_mean_error_percent)``; see the module docstring for names.
    """
    complete = {c for c, by_severity in errors.items() if set(SEVERITIES) <= set(by_severity)}
    mean_error = {c: sum(by_severity.values()) / len(by_severity) for c, by_severity in errors.items() if by_severity}
    metrics: dict[str, float] = {}
    if set(ALL_CORRUPTIONS) <= complete:
        metrics["mean_error_19"] = 100.0 * sum(mean_error[c] for c in ALL_CORRUPTIONS) / len(ALL_CORRUPTIONS)
    if set(BENCHMARK_CORRUPTIONS) <= complete:
        metrics["mean_error_15"] = 100.0 * sum(mean_error[c] for c in BENCHMARK_CORRUPTIONS) / len(BENCHMARK_CORRUPTIONS)
        metrics["mCE_alexnet_15"] = 100.0 * sum(mean_error[c] / ALEXNET_ERRORS[c]
                                                for c in BENCHMARK_CORRUPTIONS) / len(BENCHMARK_CORRUPTIONS)
    if "mean_error_19" not in metrics and mean_error:
        metrics["mean_error_evaluated"] = 100.0 * sum(mean_error.values()) / len(mean_error)
        normalisable = [c for c in complete if c in ALEXNET_ERRORS]
        if normalisable and "mCE_alexnet_15" not in metrics:
            metrics["mCE_alexnet_evaluated"] = 100.0 * sum(mean_error[c] / ALEXNET_ERRORS[c]
                                                           for c in normalisable) / len(normalisable)
    return metrics, {c: 100.0 * e for c, e in mean_error.items()}


def corruption_evidence(metrics: Mapping[str, float], groups: Sequence[tuple[str, int]],
                        counts: Mapping[str, Any], num_classes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Baselines: every metric of a uniform guess over the head's classes (error ``1 - 1/classes`` in
    every folder, through :func:`summarise`). Intervals: Wilson of the mean errors over the images they
    pool (exact when every corruption x severity folder holds the same number of images, as ImageNet-C
    does); the AlexNet-normalised mCE, a weighted sum of 15 error rates, has none."""
    guess = 1.0 - 1.0 / num_classes
    uniform, _ = summarise({name: {severity: guess for n, severity in groups if n == name} for name, _ in groups})
    baselines = {name: baseline(value, f"uniform guess over {num_classes} classes") for name, value in uniform.items()
                 if name in metrics}
    pools = {"mean_error_19": ALL_CORRUPTIONS, "mean_error_15": BENCHMARK_CORRUPTIONS,
             "mean_error_evaluated": tuple(name for name, _ in groups)}
    intervals = {}
    for name, corruptions in pools.items():
        if name in metrics:
            index = [i for i, (corruption, _) in enumerate(groups) if corruption in corruptions]
            wrong = sum(float(counts["total"][i] - counts["correct"][i]) for i in index)
            intervals[name] = wilson(round(wrong), round(sum(float(counts["total"][i]) for i in index)))
    return intervals, baselines


def _groups(root: Path, config: Mapping[str, Any]) -> tuple[list[tuple[str, int]], list[str]]:
    """The (corruption, severity) folders to evaluate, and the configured ones missing on disk."""
    unknown = [c for c in config["corruptions"] if c not in ALL_CORRUPTIONS]
    if unknown:
        raise RobustnessError(f"imagenet_c.corruptions: unknown {unknown}; expected names from {list(ALL_CORRUPTIONS)}")
    bad = [s for s in config["severities"] if int(s) not in SEVERITIES]
    if bad:
        raise RobustnessError(f"imagenet_c.severities: {bad} not in 1..5")
    present, missing = [], []
    for corruption in config["corruptions"]:
        for severity in config["severities"]:
            folder = root / corruption / str(int(severity))
            (present if folder.is_dir() else missing).append((corruption, int(severity)))
    missing_names = [f"{c}/{s}" for c, s in missing]
    if missing and not config["allow_missing"]:
        raise RobustnessError(
            f"ImageNet-C {root}: {len(missing)} corruption/severity folders are missing: {missing_names[:12]}"
            f"{' ...' if len(missing) > 12 else ''}. Fix data.imagenet_c, or set "
            f"robustness.imagenet_c.allow_missing: true (skipped ones are recorded; the 19/15-corruption "
            f"summaries are then not written)")
    if not present:
        raise RobustnessError(f"ImageNet-C {root}: none of the configured corruption/severity folders exist")
    return present, missing_names


def run(ctx: StageContext) -> dict[str, float]:
    """Top-1 of every corruption x severity folder, the summaries, per_corruption.csv and metrics.json."""
    config, root = ctx.config, ctx.data_root
    groups, missing = _groups(root, config)
    net, transform, sizes, device = prepare(ctx)
    labels = head_class_index(net.classes)
    n_groups = len(groups)
    counts = {"correct": torch.zeros(n_groups, dtype=torch.float64), "total": torch.zeros(n_groups, dtype=torch.float64)}
    num_images = 0
    log(f"[imagenet_c] {n_groups} corruption/severity folders, device {device}")
    # One loader per corruption (its severities together): the file list of the whole benchmark
    # (4.75M images) is never held in memory at once.
    for corruption in dict.fromkeys(name for name, _ in groups):
        samples = []
        for index, (name, severity) in enumerate(groups):
            if name == corruption:
                samples += folder_samples(root / name / str(severity), labels, what=f"ImageNet-C {name}/{severity}",
                                          max_per_class=config["max_images_per_class"], group=index)
        dataset = LabelledImages(samples, transform)
        num_images += len(dataset)
        group_of = dataset.groups.to(device)

        def step(images, targets, indices, group_of=group_of):
            correct = net(images).argmax(dim=-1).eq(targets)
            group = group_of[indices.to(device)]
            return {"correct": torch.bincount(group[correct], minlength=n_groups),
                    "total": torch.bincount(group, minlength=n_groups)}

        result = accumulate(shard_loader(dataset, config["batch_size"], config["num_workers"]), step,
                            {"correct": n_groups, "total": n_groups}, device=device, desc=f"imagenet_c {corruption}")
        for key in counts:
            counts[key] += result[key]

    if not is_main():
        return {}
    rows, errors = [], {}
    for index, (corruption, severity) in enumerate(groups):
        top1 = percent(counts["correct"][index], counts["total"][index])
        errors.setdefault(corruption, {})[severity] = 1.0 - top1 / 100.0
        rows.append({"corruption": corruption, "severity": severity, "n_images": int(counts["total"][index]),
                     "top1": round(top1, 4), "error": round(100.0 - top1, 4),
                     "set": "benchmark" if corruption in BENCHMARK_CORRUPTIONS else "extra"})
    metrics, per_corruption = summarise(errors)
    table = ctx.dir / "per_corruption.csv"
    write_csv_atomic(table, rows, ["corruption", "severity", "set", "n_images", "top1", "error"])
    extra = common_extra(net, sizes, device)
    extra.update({
        "reported": "mean_error_19",
        "definitions": {
            "mean_error_19": "unnormalised mean top-1 error (%) over 19 corruptions x 5 severities "
                             "(iBOT Tab.8 'mCE', note R3)",
            "mean_error_15": "unnormalised mean top-1 error (%) over the 15 benchmark corruptions",
            "mCE_alexnet_15": "AlexNet-normalised mCE (%) over the 15 benchmark corruptions "
                              "(Hendrycks & Dietterich 2019)",
        },
        "per_corruption_mean_error": per_corruption, "missing": missing, "num_images": num_images,
        "per_corruption_csv": table.name, "alexnet_errors": ALEXNET_ERRORS,
    })
    intervals, baselines = corruption_evidence(metrics, groups, counts, net.num_classes)
    write_robustness_metrics(ctx, dataset="imagenet-c", metrics=metrics, extra=extra, head_meta=net.head.meta,
                             intervals=intervals, baselines=baselines)
    return metrics
