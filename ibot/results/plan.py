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

* **Pretraining time marks**: the wall hours at 100, 300 and 800 epochs when the job reaches them
  (the paper's Tab.19 T100/T300/T800), proportional to epochs like everything above.
* **Peak memory per process** of pretraining (:func:`training_memory`): parameters, gradients and AdamW
  states of the student, the EMA teacher's parameters, plus the activations the student saves for its
  backward (per crop ~ depth x tokens x embed_dim, plus heads x tokens^2 attention maps unless attention is
  fused; the head's MLP and logits for the tokens it projects; halved by fp16/bf16 autocast), scaled by ONE
  factor calibrated on Tab.19's iBOT 2x224^2 row (13.1 GB, V100, 64 images per GPU, fp16). GiB (2^30 bytes),
  as ``torch.cuda.max_memory_allocated`` / 1024^3, the quantity the trainer records as ``peak_memory_gb``.

Treat the figures as the order of magnitude that decides whether to launch, not as a schedule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ibot.models.specs import ARCHITECTURES, ArchSpec, SwinSpec
from ibot.stages import BACKBONE_STAGE

__all__ = ["DATASET_IMAGES", "Job", "vit_forward_flops", "backbone_forward_flops", "job_work", "plan", "load_rates",
           "format_plan", "DEFAULT_RATES", "TIME_MARKS", "epoch_hours", "MemoryCase", "memory_case",
           "training_memory", "activation_factor", "pretrain_memory_gb", "TAB19_SETTINGS", "tab19_memory"]

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
    epoch_hours: dict[int, float] = field(default_factory=dict)  # pretraining: wall hours at TIME_MARKS reached
    peak_memory_gb: float | None = None  # pretraining: predicted peak GiB per process (training_memory)


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
    if stage in ("linear", "linear_part"):  # frozen backbone forward on augmented images every epoch, val each epoch
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


# -- pretraining time marks and peak memory (the paper's Tab.19) ---------------------------------------------

#: Epochs of the paper's Tab.19 wall-clock columns T100/T300/T800 (arXiv:2111.07832v3); ibot.train.pretrain
#: records the same marks (``train_hours_<m>ep``).
TIME_MARKS = (100, 300, 800)
GIB = 2 ** 30
#: The published point the memory model is calibrated on (its only free constant, :func:`activation_factor`):
#: Tab.19 iBOT ViT-S/16, 2x224^2 crops, 13.1 GB per V100, global batch 1024 on 16 GPUs (64 per GPU), fp16.
CALIBRATION = {"setting": "iBOT 2x224", "peak_gib": 13.1, "source": "arXiv:2111.07832v3 Tab.19"}


def epoch_hours(wall_hours: float, epochs: int, marks: Sequence[int] = TIME_MARKS) -> dict[int, float]:
    """Wall hours at each mark the run reaches: the job's hours x mark / epochs (cost proportional to epochs)."""
    return {mark: wall_hours * mark / epochs for mark in marks if epochs and mark <= epochs}


@dataclass(frozen=True)
class MemoryCase:
    """What one training process holds at its peak (end of the student's forward), in countable terms.

    Per image of the process's batch: the student backbone's crops, the tokens through the head's MLP
    (its saved activations), and the tokens whose logits enter a loss (student logits + log-softmax,
    teacher logits + softmax targets)."""

    arch: str
    patch: int
    batch: int  # images per process
    crops: tuple[tuple[int, int], ...]  # (number, side) of the crops the student back-propagates
    half: bool  # fp16 / bf16 autocast: activations in 2 bytes
    fused_attention: bool  # SDPA saves no tokens^2 attention maps
    head_tokens: float  # student tokens through the head MLP per image
    cls_logit_tokens: float  # [CLS] tokens with a loss over out_dim per image
    patch_logit_tokens: float  # patch tokens with a loss over patch_out_dim per image
    out_dim: int = 8192
    patch_out_dim: int = 8192
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    depth: int | None = None  # None: the architecture's
    teacher: bool = True  # an EMA teacher (fp32 parameters, no gradients or optimizer states)
    separate_patch_layer: bool = False  # the student's own patch output layer (shared_head false)
    frozen_params: int = 0  # other frozen weights held (BEiT's DALL-E tokenizer)
    linear_head: bool = False  # a single linear layer instead of the MLP head (BEiT)


def _vit_params(spec: ArchSpec, depth: int, patch: int, size: int) -> int:
    dim, hidden = spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio)
    block = 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim + 4 * dim  # qkv, proj, MLP, 2 norms
    return 3 * patch * patch * dim + dim + ((size // patch) ** 2 + 2) * dim + depth * block + 2 * dim


def _head_params(case: MemoryCase, dim: int, patch_layer: bool) -> int:
    if case.linear_head:
        return dim * case.patch_out_dim + case.patch_out_dim
    h, b = case.hidden_dim, case.bottleneck_dim
    mlp = dim * h + h + h * h + h + h * b + b
    return mlp + b * case.out_dim + case.out_dim + (b * case.patch_out_dim + case.patch_out_dim if patch_layer else 0)


def training_memory(case: MemoryCase, factor: float | None = None) -> dict[str, float]:
    """Peak bytes of one training process (analytic, see the module doc): ``states`` (student weights,
    gradients, AdamW moments, the autocast weight copies; teacher weights; frozen weights), the analytic
    saved ``activations`` and ``total`` = states + factor x activations (``factor``: :func:`activation_factor`)."""
    spec = ARCHITECTURES[case.arch]
    if isinstance(spec, SwinSpec):
        raise ValueError(f"training_memory: no memory model for Swin ({case.arch}); ViT only")
    depth, dim, heads = case.depth or spec.depth, spec.embed_dim, spec.num_heads
    size = max(side for _, side in case.crops)
    backbone = _vit_params(spec, depth, case.patch, size)
    student = backbone + _head_params(case, dim, case.separate_patch_layer)
    teacher = backbone + _head_params(case, dim, False) if case.teacher else 0
    act = 2 if case.half else 4
    # fp32 weights + gradients + 2 AdamW moments, autocast's cached half copies, fp32 teacher and frozen weights
    states = student * (16 + (2 if case.half else 0)) + 4 * (teacher + case.frozen_params)
    saved = 0.0
    for number, side in case.crops:
        tokens = (side // case.patch) ** 2 + 1
        # per block: LN in, qkv in, q, k, v, attention out, LN in, fc1 in, fc1 out (4D), GELU out (4D) = 16 D
        # (Korthikanti et al. 2022, without dropout); attention maps: softmax output (fp32 under autocast)
        # + its half copy for attn @ v, unless fused attention recomputes them
        maps = 0 if case.fused_attention else heads * tokens * tokens * (6 if case.half else 4)
        saved += number * (depth * (16 * tokens * dim * act + maps) + 3 * side * side * act)
    h, b = case.hidden_dim, case.bottleneck_dim
    per_head_token = dim if case.linear_head else dim + 4 * h + 3 * b  # MLP inputs/outputs, L2 norm, last layer
    saved += case.head_tokens * per_head_token * act
    # per logit in a loss: student logits (act) + fp32 log-softmax, teacher logits (act) + fp32 softmax targets
    per_logit = 2 * act + 8 if case.teacher else act + 4
    saved += case.cls_logit_tokens * case.out_dim * per_logit + case.patch_logit_tokens * case.patch_out_dim * per_logit
    activations = case.batch * saved
    factor = activation_factor() if factor is None else factor
    return {"states": float(states), "activations": activations, "factor": factor,
            "total": states + factor * activations}


def _mean_ratio(value: Any) -> float:
    """Mean masking ratio over the images (a list of ratios: images split evenly, official main_ibot.py)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return sum(float(v) for v in values) / len(values) if values else 0.0


def memory_case(cfg: Mapping[str, Any], arch: str, patch: int, *, half: bool, fused_attention: bool,
                layout: str = "ours", depth: int | None = None) -> MemoryCase:
    """The :class:`MemoryCase` of a pretraining stage config.

    ``layout`` = which code runs it: ``ours`` (ibot.train.pretrain: the student head projects [CLS] of
    every crop and only the *masked* patch tokens of the global crops); ``official`` (main_ibot.py: the
    head runs on every token of every crop, the patch loss on every global patch token, then masked;
    with MIM off -- DINO -- only [CLS] is needed, as DINO's main_dino.py computes)."""
    g, gs = int(cfg["global_crops_number"]), int(cfg["global_crops_size"])
    l, ls = int(cfg["local_crops_number"]), int(cfg["local_crops_size"])
    grid_g, grid_l = (gs // patch) ** 2, (ls // patch) ** 2
    mim = float(cfg.get("lambda2", 1.0)) > 0 and _mean_ratio(cfg.get("pred_ratio", 0.0)) > 0
    if layout == "ours":
        masked = g * grid_g * _mean_ratio(cfg.get("pred_ratio", 0.0)) if mim else 0.0
        head_tokens, patch_logits = g + l + masked, masked
    elif layout == "official":
        head_tokens = g * (grid_g + 1) + l * (grid_l + 1) if mim else g + l
        patch_logits = g * grid_g if mim else 0.0
    else:
        raise ValueError(f"memory_case: layout {layout!r}; expected 'ours' or 'official'")
    out_dim = int(cfg["out_dim"])
    shared = bool(cfg.get("shared_head"))
    return MemoryCase(arch, patch, int(cfg["batch_size_per_gpu"]), ((g, gs),) + (((l, ls),) if l else ()),
                      half, fused_attention, head_tokens, float(g + l), patch_logits, out_dim=out_dim,
                      patch_out_dim=out_dim if shared else int(cfg.get("patch_out_dim", out_dim)),
                      hidden_dim=int(cfg.get("head_hidden_dim", 2048)), depth=depth,
                      separate_patch_layer=not shared)


#: Tab.19's settings (ViT-S/16, 64 images per V100, fp16, the 2021 code's explicit softmax attention), as
#: pretraining config changes of the ViT-S/16 recipe (config/paper/vit_small.yaml). DINO = the iBOT code with
#: MIM off (lambda2 0, pred_ratio 0); iBOT 2x224: the ablation base (r = 0.3 fixed; Tab.19 prints no ratio);
#: iBOT multi-crop: the paper's default ratios. BEiT: one 224^2 crop, no teacher, a linear head on the 40 %
#: masked patches (75 of 196), and the frozen DALL-E tokenizer encoder (~54 M parameters; an approximation).
TAB19_SETTINGS: dict[str, dict[str, Any]] = {
    "BEiT 1x224": {"beit": True},
    "DINO 2x224": {"local_crops_number": 0, "pred_ratio": 0.0, "pred_ratio_var": 0.0, "lambda2": 0.0},
    "iBOT 2x224": {"local_crops_number": 0, "pred_ratio": 0.3, "pred_ratio_var": 0.0},
    "DINO 2x224+10x96": {"local_crops_number": 10, "pred_ratio": 0.0, "pred_ratio_var": 0.0, "lambda2": 0.0},
    "iBOT 2x224+10x96": {"local_crops_number": 10, "pred_ratio": [0.0, 0.3], "pred_ratio_var": [0.0, 0.2]},
}
_VIT_S_RECIPE = {"global_crops_number": 2, "global_crops_size": 224, "local_crops_size": 96, "batch_size_per_gpu": 64,
                 "out_dim": 8192, "patch_out_dim": 8192, "shared_head": True, "head_hidden_dim": 2048, "lambda2": 1.0}


def tab19_case(setting: str, layout: str = "official") -> MemoryCase:
    """The :class:`MemoryCase` of one Tab.19 setting (V100, fp16, unfused attention, 64 images per GPU)."""
    cfg = {**_VIT_S_RECIPE, **TAB19_SETTINGS[setting]}
    if cfg.pop("beit", False):
        masked = 75.0  # BEiT's 40 % block masking of 196 patches
        return MemoryCase("vit_small", 16, 64, ((1, 224),), True, False, head_tokens=masked, cls_logit_tokens=0,
                          patch_logit_tokens=masked, teacher=False, frozen_params=54_000_000, linear_head=True)
    return memory_case(cfg, "vit_small", 16, half=True, fused_attention=False, layout=layout)


def activation_factor() -> float:
    """The one calibrated constant: measured / analytic activation bytes on :data:`CALIBRATION` (Tab.19 iBOT
    2x224^2, 13.1 GB), counted with the official layout, the code that produced the table. It absorbs what
    the count leaves out (drop-path masks, norm statistics, transient buffers at the peak) and is a property
    of the backbone arithmetic, so the same factor predicts this repository's trainer (layout ``ours``)."""
    memory = training_memory(tab19_case(CALIBRATION["setting"], "official"), factor=0.0)
    return (CALIBRATION["peak_gib"] * GIB - memory["states"]) / memory["activations"]


def tab19_memory(layout: str = "official") -> dict[str, float]:
    """Predicted peak GiB per GPU of every Tab.19 setting: ``official`` = the code behind the table (compare
    with its numbers), ``ours`` = this repository's trainer in the same setting (masked-token heads)."""
    factor = activation_factor()
    return {name: training_memory(tab19_case(name, layout), factor)["total"] / GIB for name in TAB19_SETTINGS}


def _resolved_precision(cfg: Mapping[str, Any], cuda: bool, device_precision: str | None) -> str:
    """ibot.train.pretrain._precision without torch: auto = fp16 on CUDA when use_fp16 (official), else fp32."""
    choice = cfg.get("precision", "auto")
    if choice == "auto":
        return "fp16" if cfg.get("use_fp16", True) and cuda else "fp32"
    if choice == "bf16_if_native":
        return "bf16" if cuda or device_precision == "bf16" else "fp32"
    return str(choice)


def pretrain_memory_gb(cfg: Mapping[str, Any], arch: str, patch: int, kind: str,
                       device: Mapping[str, Any] | None = None, depth: int | None = None) -> float | None:
    """Predicted peak GiB per process of this repository's trainer on ``kind`` (None for Swin): CUDA kinds
    (``nvidia-*``) use fused attention, CPU the explicit softmax under autocast (select_attention_kernel)."""
    if isinstance(ARCHITECTURES.get(arch), SwinSpec):
        return None
    cuda = kind.startswith("nvidia")
    half = _resolved_precision(cfg, cuda, (device or {}).get("precision")) in ("fp16", "bf16")
    case = memory_case(cfg, arch, patch, half=half, fused_attention=cuda or not half, depth=depth)
    return training_memory(case)["total"] / GIB


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
                job = Job(model, name, gpus, flops, what, hours, hours / gpus)
                if stage == BACKBONE_STAGE.name:
                    arch = config["models"][model]["arch"]
                    job.epoch_hours = epoch_hours(job.wall_hours, int(run_cfg["epochs"]))
                    job.peak_memory_gb = pretrain_memory_gb(run_cfg, arch, config["models"][model]["patch_size"],
                                                            kind, (rates.get("devices") or {}).get(kind),
                                                            depth=config["models"][model].get("depth"))
                jobs.append(job)
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
    pretraining = [j for j in jobs if j.stage == BACKBONE_STAGE.name]
    if pretraining:  # the paper's Tab.19 quantities, predicted for this device kind
        lines.append(f"pretraining on {kind} (Tab.19 quantities): wall hours at 100/300/800 epochs where reached; "
                     f"peak GiB per process (memory model calibrated on Tab.19 iBOT 2x224^2, 13.1 GB V100, "
                     f"factor {activation_factor():.2f})")
        lines.append(f"{'model':<24} {'GPUs':>4} {'T100 h':>8} {'T300 h':>8} {'T800 h':>8} {'peak GiB':>9}")
        for job in pretraining:
            marks = [f"{job.epoch_hours[m]:>8.1f}" if m in job.epoch_hours else f"{'-':>8}" for m in TIME_MARKS]
            memory = f"{job.peak_memory_gb:>9.1f}" if job.peak_memory_gb is not None else f"{'-':>9}"
            lines.append(f"{job.model:<24} {job.gpus:>4} {' '.join(marks)} {memory}")
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
