"""What a run will cost before it starts: device-hours and wall time of every job of the DAG.

``python -m ibot.results plan --configfile config/paper.yaml [--device-kind nvidia-h200]``

The model is deliberately simple and says what it assumes:

* **Work** of a job = the images it pushes through the backbone, each weighted by the backbone's
  forward FLOPs at the stage's input size (:func:`vit_forward_flops`, analytic: patch embedding,
  qkv/proj/MLP matmuls and attention; Swin scaled from its published 4.5 GFLOPs at 224 px), times 3
  for images that are also back-propagated. The images come from the resolved stage config (epochs,
  iterations x batch, crops, corruptions, occlusion ratios, ...) and the real datasets' sizes
  (:data:`DATASET_IMAGES`). Heads (iBOT head, Cascade Mask R-CNN, UperNet) and data loading are not
  counted separately: they are absorbed by the calibration below for pretraining, and make the dense
  stages' figures lower bounds.
* **Rate**: the device's measured ViT-S/16 pretraining throughput (``bench/measured_rates.json``,
  written from ``bench/pretrain_step.py`` / the trainer's own log on that device, with how it was
  measured), converted into effective FLOP/s of the backbone arithmetic. Every job of that device is
  assumed to reach the same effective rate.
* **Wall time** = device-hours / the job's GPUs (``resources``: nodes x gpus_per_node), i.e. perfect
  scaling, no queueing.

Treat the figures as the order of magnitude that decides whether to launch, not as a schedule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ibot.models.specs import ARCHITECTURES, ArchSpec, SwinSpec
from ibot.stages import BACKBONE_STAGE

__all__ = ["DATASET_IMAGES", "Job", "vit_forward_flops", "backbone_forward_flops", "job_work", "plan", "load_rates",
           "format_plan", "DEFAULT_RATES"]

DEFAULT_RATES = Path(__file__).resolve().parents[2] / "bench" / "measured_rates.json"

#: Images of the real datasets (train / val splits as the stages read them).
DATASET_IMAGES: dict[str, int] = {
    "imagenet_train": 1_281_167, "imagenet_val": 50_000, "imagenet22k_train": 14_197_122,
    "coco_train": 118_287, "coco_val": 5_000, "ade20k_train": 20_210, "ade20k_val": 2_000,
    "imagenet_a": 7_500, "imagenet_r": 30_000, "imagenet_9_variant": 4_050,
    "cifar10_train": 50_000, "cifar10_val": 10_000, "cifar100_train": 50_000, "cifar100_val": 10_000,
    "flowers_train": 2_040, "flowers_val": 6_149, "cars_train": 8_144, "cars_val": 8_041,
    "inat18_train": 437_513, "inat18_val": 24_426, "inat19_train": 265_213, "inat19_val": 3_030,
    "revisitop": 4_993 + 6_322 + 70 + 70,  # roxford5k + rparis6k database images and queries
    "davis_val_frames": 1_999,
}
IMAGENET_C_SETS = 19 * 5  # 15 corruptions + 4 extra, 5 severities each, over the 50k val images
BG_CHALLENGE_VARIANTS = 9  # original, only_bg_b, only_bg_t, no_fg, only_fg, mixed_same/rand/next, + ...
SWIN_TINY_GFLOPS_224 = 4.5  # Liu et al. 2021, Table 1 (window 7)


def vit_forward_flops(spec: ArchSpec, height: int, width: int, patch: int) -> float:
    """Forward FLOPs (2 x multiply-adds) of a ViT on one image: patch embedding, then per block the
    qkv/proj/MLP matmuls (4 + 2 * mlp_ratio) * N * D^2 and attention 2 * N^2 * D, N tokens incl. [CLS]."""
    grid = (height // patch) * (width // patch)
    tokens, dim = grid + 1, spec.embed_dim
    block = (4 + 2 * spec.mlp_ratio) * tokens * dim * dim + 2 * tokens * tokens * dim
    return 2.0 * (grid * 3 * patch * patch * dim + spec.depth * block)


def backbone_forward_flops(arch: str, height: int, width: int, patch: int) -> float:
    spec = ARCHITECTURES[arch]
    if isinstance(spec, SwinSpec):  # windowed attention: linear in pixels; scaled from the published figure
        scale = (spec.patch_embed_dim / 96) ** 2 * spec.depth / 12
        return SWIN_TINY_GFLOPS_224 * 2e9 * scale * height * width / 224 ** 2  # GFLOPs are multiply-adds
    return vit_forward_flops(spec, height, width, patch)


@dataclass
class Job:
    """One job of the plan and its estimated cost."""

    model: str
    stage: str
    gpus: int
    work_flops: float  # backbone forward-equivalent FLOPs of the whole job
    what: str  # the images counted, in words
    device_hours: float = 0.0
    wall_hours: float = 0.0


Passes = list[tuple[float, int, int, float]]  # (images, height, width, cost factor: 1 forward, 3 training)


def _square(size: Any, default: int = 224) -> int:
    return int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else default


def _imagenet_train(config: Mapping[str, Any], model: str) -> int:
    data = (config["models"][model].get("pretrain_data") or "IN-1K")
    return DATASET_IMAGES["imagenet22k_train" if data == "IN-22K" else "imagenet_train"]


def _stage_passes(stage: str, cfg: Mapping[str, Any], config: Mapping[str, Any], model: str) -> tuple[Passes, str]:
    """The (images, size, factor) of one stage from its resolved config, and a short description."""
    n_train, n_val = DATASET_IMAGES["imagenet_train"], DATASET_IMAGES["imagenet_val"]
    if stage == BACKBONE_STAGE.name:
        images = cfg["epochs"] * _imagenet_train(config, model)
        g, gs = cfg["global_crops_number"], cfg["global_crops_size"]
        l, ls = cfg["local_crops_number"], cfg["local_crops_size"]
        # teacher forward on the globals (1x), student forward + backward on globals and locals (3x)
        passes = [(images * g, gs, gs, 4.0)] + ([(images * l, ls, ls, 3.0)] if l else [])
        return passes, f"{cfg['epochs']} ep x {images // cfg['epochs']:,} img, {g}x{gs} + {l}x{ls}"
    crop = _square(cfg.get("crop"))
    if stage in ("knn", "unsupervised"):
        return [(n_train + n_val, crop, crop, 1.0)], "features of IN-1K train + val"
    if stage == "linear":  # frozen backbone forward on augmented images every epoch, val each epoch
        return [(cfg["epochs"] * (n_train + n_val), crop, crop, 1.0)], f"{cfg['epochs']} ep forward"
    if stage == "finetune":
        return ([(cfg["epochs"] * n_train, crop, crop, 3.0), (cfg["epochs"] * n_val, crop, crop, 1.0)],
                f"{cfg['epochs']} ep fine-tuning")
    if stage == "semi_supervised":
        ft = cfg.get("finetune") or {}
        subset = 0.11 * n_train  # 1 % and 10 % label subsets
        heads = sum(p in (cfg.get("protocols") or []) for p in ("finetune", "finetune_head"))
        epochs = int(ft.get("epochs") or 0)
        passes = [(4 * (subset + n_val), crop, crop, 1.0), (100 * subset, crop, crop, 1.0)]  # knn/logreg/linear
        passes.append((heads * epochs * subset, crop, crop, 3.0))
        return passes, f"1%+10% subsets: {heads} fine-tunings x {epochs} ep + feature protocols"
    if stage == "detection":
        iters = cfg["epochs"] * DATASET_IMAGES["coco_train"]
        return ([(iters, 800, 1333, 3.0), (DATASET_IMAGES["coco_val"], 800, 1333, 1.0)],
                f"{cfg['epochs']} ep COCO at ~800x1333 (backbone only)")
    if stage in ("seg_upernet", "seg_linear"):
        size = _square(cfg.get("crop_size"), 512)
        return ([(cfg["iters"] * cfg["batch_size"], size, size, 3.0),
                 (DATASET_IMAGES["ade20k_val"], size, 4 * size, 1.0)],
                f"{cfg['iters']:,} it x {cfg['batch_size']} at {size} (backbone only)")
    if stage == "imagenet_c":
        return [(IMAGENET_C_SETS * n_val, 224, 224, 1.0)], "19 corruptions x 5 severities x 50k"
    if stage == "imagenet_a":
        return [(DATASET_IMAGES["imagenet_a"], 224, 224, 1.0)], "IN-A"
    if stage == "imagenet_r":
        return [(DATASET_IMAGES["imagenet_r"], 224, 224, 1.0)], "IN-R"
    if stage == "bg_challenge":
        return [(BG_CHALLENGE_VARIANTS * DATASET_IMAGES["imagenet_9_variant"], 224, 224, 1.0)], "9 IN-9 variants"
    if stage == "occlusion":
        ratios = len(cfg.get("ratios") or [])
        return [(3 * ratios * n_val, 224, 224, 1.0)], f"{ratios} ratios x 3 modes x 50k"
    if stage.startswith("transfer_"):
        name = stage.removeprefix("transfer_")
        train, val = DATASET_IMAGES[f"{name}_train"], DATASET_IMAGES[f"{name}_val"]
        return ([(cfg["epochs"] * train, crop, crop, 3.0), (cfg["epochs"] * val, crop, crop, 1.0)],
                f"{cfg['epochs']} ep fine-tuning on {name}")
    if stage == "retrieval":
        size = _square(cfg.get("imsize"), 512)
        scales = 3 if cfg.get("multiscale") else 1
        return [(scales * DATASET_IMAGES["revisitop"], size, size, 1.0)], "ROxford + RParis, multi-scale"
    if stage == "video_segmentation":
        size = _square(cfg.get("scale_size"), 480)
        return [(DATASET_IMAGES["davis_val_frames"], size, size * 16 // 9, 1.0)], "DAVIS-2017 val frames"
    raise KeyError(f"plan: no cost model for stage {stage!r} (add one to ibot/results/plan.py)")


def job_work(stage: str, cfg: Mapping[str, Any], config: Mapping[str, Any], model: str) -> tuple[float, str]:
    """Backbone forward-equivalent FLOPs of one job, and what was counted."""
    entry = config["models"][model]
    passes, what = _stage_passes(stage, cfg, config, model)
    flops = sum(images * factor * backbone_forward_flops(entry["arch"], h, w, entry["patch_size"])
                for images, h, w, factor in passes)
    return flops, what


def load_rates(path: str | Path = DEFAULT_RATES) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"measured rates {path} not found (bench/measured_rates.json in the repository)")
    return json.loads(path.read_text())


def effective_flops_per_s(rates: Mapping[str, Any], kind: str) -> tuple[float, Mapping[str, Any]]:
    """The device's measured ViT-S/16 pretraining img/s as effective backbone FLOP/s (see module doc)."""
    devices = rates.get("devices") or {}
    if kind not in devices:
        raise KeyError(f"bench/measured_rates.json has no device {kind!r}; measured: {', '.join(sorted(devices))}")
    device = devices[kind]
    reference = device["pretrain"]
    per_image = sum(
        count * factor * backbone_forward_flops(reference["arch"], size, size, reference["patch_size"])
        for count, size, factor in ((reference["global_crops"], reference["global_size"], 4.0),
                                    (reference["local_crops"], reference["local_size"], 3.0)))
    return per_image * reference["images_per_s"], device


def plan(config: Mapping[str, Any], rates: Mapping[str, Any], kind: str) -> list[Job]:
    """Every job the Snakemake DAG of ``config`` runs (pretraining, then each planned stage), costed."""
    from ibot.config import planned_stages, stage_config, stage_resources

    from ibot.stages import STAGES
    from ibot.sweep import run_config, sweep_values, value_label

    rate, _ = effective_flops_per_s(rates, kind)
    jobs = []
    for model in config["models"]:
        for stage in planned_stages(config, model):
            resources = stage_resources(config, stage, model)
            gpus = max(1, int(resources.get("nodes") or 1) * int(resources.get("gpus_per_node") or 1))
            cfg = stage_config(config, stage, model)
            entry = STAGES[stage]
            sweep = entry.sweep  # a swept stage runs one job per value
            runs = [(f"{stage}[{sweep[1]}={value_label(v)}]", run_config(entry, cfg, v))
                    for v in sweep_values(cfg, sweep[0], sweep[1])] if sweep else [(stage, cfg)]
            for name, run_cfg in runs:
                flops, what = job_work(stage, run_cfg, config, model)
                hours = flops / rate / 3600
                jobs.append(Job(model, name, gpus, flops, what, hours, hours / gpus))
    return jobs


def format_plan(jobs: list[Job], kind: str, device: Mapping[str, Any]) -> str:
    """A table per job and the totals (device-hours; wall time if every job ran one after another)."""
    lines = [f"Estimated cost on {kind} ({device.get('precision', '?')}; rate from {device['pretrain']['source']})",
             f"{'model':<24} {'stage':<22} {'GPUs':>4} {'PFLOP':>9} {'GPU-h':>9} {'wall h':>8}  counted"]
    for job in jobs:
        lines.append(f"{job.model:<24} {job.stage:<22} {job.gpus:>4} {job.work_flops / 1e15:>9.0f} "
                     f"{job.device_hours:>9.1f} {job.wall_hours:>8.1f}  {job.what}")
    total = sum(j.device_hours for j in jobs)
    pretrain = sum(j.device_hours for j in jobs if j.stage == BACKBONE_STAGE.name)
    serial = sum(j.wall_hours for j in jobs)
    lines.append(f"total: {len(jobs)} compute jobs (the DAG's other jobs, attention maps, sweep selection and "
                 "tables, take minutes), "
                 f"{total:,.0f} GPU-hours ({pretrain:,.0f} pretraining, "
                 f"{total - pretrain:,.0f} evaluations), {serial:,.0f} h wall if run one after another "
                 f"({math.ceil(serial / 24)} days); dense stages count the backbone only (lower bounds)")
    return "\n".join(lines)


def main_plan(configfiles: list[str], kind: str, rates_path: str | Path, as_json: str | None,
              printer: Callable[[str], Any] = print, overrides: Sequence[str] = ()) -> list[Job]:
    """The ``plan`` command: the workflow's config (as Snakemake loads and validates it, ``overrides`` as
    its ``--config KEY=VALUE``), costed."""
    from ibot.config import load_workflow_config
    from ibot.io import write_json_atomic

    config, _ = load_workflow_config(configfiles, list(overrides))
    rates = load_rates(rates_path)
    jobs = plan(config, rates, kind)
    printer(format_plan(jobs, kind, rates["devices"][kind]))
    if as_json:
        write_json_atomic({"device_kind": kind, "jobs": [vars(j) for j in jobs]}, Path(as_json))
    return jobs
