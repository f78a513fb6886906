"""Transfer learning by fine-tuning (iBOT Tab. 7): the DeiT recipe of the official ``eval_cls.py``.

Official: bytedance/ibot (commit da316d8) ``evaluation/eval_cls.py`` ("mostly copy-paste from DeiT",
:7-10) as ``run.sh`` launches it per dataset (``cifar10_cls`` :242-261, ``cifar_cls`` :223-241,
``cars_cls`` :262-280, ``flwrs_cls`` :281-299, ``inat_cls`` :300-319, ``inat19_cls`` :320-339:
``--batch-size 96 --lr <lr> --epochs <n>``, iNat also ``--reprob 0.1``) on 8 GPUs
(``evaluation/README.md:121``); "w/o layerwise decay, a smaller learning rate, and a longer training
scheduler" (README:117). run.sh is the ViT-B/16 recipe; ViT-S/16 takes lr 5e-5 (iNat 2018) and
2.5e-5 (iNat 2019) (README:123). Values: ``workflow/schemas/transfer.schema.yaml``. Here, with the
fine-tuning loop of :mod:`downstream.engine.finetune` (timm components); one registry stage per
dataset (``transfer_<kind>``, :data:`ibot.stages.TRANSFER_DATASETS`), all running :func:`run`:

- data: the official readers (:mod:`ibot.data.transfer_sets`, eval_cls.py:196-313); train transform
  timm ``create_transform`` (RandomResizedCrop bicubic, flip, colour jitter 0.4, RandAugment
  ``rand-m9-mstd0.5-inc1``, random erasing 0.25 pixel mode; RandomCrop(padding 4) when the crop is
  <= 32 px), eval ``Resize(int(256 / 224 x crop), bicubic)`` + ``CenterCrop`` (none at <= 32 px)
  (:315-346: :func:`downstream.engine.data.finetune_train_transform`, :func:`eval_transform`);
- repeated augmentation (:123-125, ``RASampler`` :348-399): timm's ``RepeatAugSampler`` (its copy of
  DeiT's): every image 3 times per epoch, ``len // 256 x 256`` samples per epoch over all processes
  (fewer than 256 images: ``ceil(len / processes)``, timm's rule); order seeded by the epoch only;
- model: backbone with drop path 0.1 (:64) + linear head on the final-norm [CLS] token (run.sh:50-58
  ``--avgpool_patchtokens 0``), head trunc-normal(0.02), bias 0, scale 1 (:625-629)
  (:class:`downstream.engine.finetune.ViTClassifier`);
- ``timm.data.Mixup`` (mixup 0.8, cutmix 1.0, prob 1, switch 0.5, batch mode, label smoothing 0.1,
  :596-602) + ``SoftTargetCrossEntropy`` (:697-705);
- AdamW (eps 1e-8, AdamW's betas), weight decay 0.05 except 1-D params, pos_embed and cls_token, no
  layer decay (timm ``create_optimizer``, :692); lr = ``lr x global batch / 512`` (:690,
  :data:`ibot.config.LR_SCALING`);
- timm cosine schedule per epoch (``create_scheduler``, :695): warmup 5 epochs from 1e-6, then cosine
  over all epochs to 1e-5. The loop steps it after epoch ``e`` with ``e`` (:768), so epoch ``e``
  trains at the schedule's value of ``e - 1`` (epochs 0 and 1 both at the warmup start): kept;
- fp16 AMP with a grad scaler (:475, :693), no gradient clipping, drop_last batches (:585);
- evaluation after every epoch (:769); reported ``top1``/``top5`` are those of the best epoch (the
  official "Max accuracy", :786), the last epoch's are in ``extra``.

Not reproduced: the model EMA (:675-681, :494-495): kept by the official run but never evaluated or
reported, so without effect on the metric. Training state is checkpointed after every epoch in
``<out dir>/work/checkpoint.pth`` (``ibot.workdir``): a rerun resumes from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from downstream.engine.data import (IMAGENET_MEAN, IMAGENET_STD, Indexed, eval_transform as resize_crop_transform,
                                    finetune_train_transform, make_loader, train_sampler)
from downstream.engine.finetune import build_mixup, build_model, fit, plan_batches
from downstream.engine.metrics import best_and_last
from downstream.engine.setup import log, pick_device, resolve_precision, seed_everything
from ibot.config import scaled_lr
from ibot.data.transfer_sets import read_transfer_set
from ibot.distributed import world_size
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_evidence

__all__ = ["OFFICIAL_SETS", "eval_transform", "dataset_label", "protocol_label", "run"]

#: The real sets: (label, classes, train images, val/test images). A run on anything else is labelled
#: by its folder name, so it is never joined to the paper's numbers.
OFFICIAL_SETS: dict[str, tuple[str, int, int, int]] = {
    "cifar10": ("cifar-10", 10, 50_000, 10_000),
    "cifar100": ("cifar-100", 100, 50_000, 10_000),
    "inat18": ("inat-2018", 8142, 437_513, 24_426),
    "inat19": ("inat-2019", 1010, 265_213, 3_030),
    "flowers": ("flowers-102", 102, 2_040, 6_149),
    "cars": ("stanford-cars", 196, 8_144, 8_041),
}


def eval_transform(config: Mapping[str, Any]) -> transforms.Compose:
    """Official eval transform (eval_cls.py:336-346): resize by 256/224 + centre crop, bicubic; at a
    crop <= 32 px (CIFAR at native size) only the tensor conversion and normalisation."""
    crop = int(config["crop"])
    if crop <= 32:
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return resize_crop_transform(int(256 / 224 * crop), crop, "bicubic")


def dataset_label(kind: str, data: str | Path, num_classes: int, num_train: int, num_val: int) -> str:
    """The real set's label (e.g. ``cifar-10``) when the sizes are the release's, else the folder name."""
    label, classes, train, val = OFFICIAL_SETS[kind]
    return label if (num_classes, num_train, num_val) == (classes, train, val) else Path(data).resolve().name


def protocol_label(config: Mapping[str, Any], global_batch: int | None = None) -> str:
    """What this run is, from its config and actual global batch (the results join the paper's numbers
    only to the paper's protocol, e.g. ``deit,1000ep,lr=7.5e-06,batch=768,re=0.25,mixup=0.8,cutmix=1,ra,
    cls,224px`` for CIFAR-10 with ViT-S/16; iNat adds its label level)."""
    batch = int(config["batch_size"]) if global_batch is None else int(global_batch)
    label = (f"deit,{int(config['epochs'])}ep,lr={float(config['lr']):g},batch={batch},"
             f"re={float(config['re_prob']):g},mixup={float(config['mixup']):g},cutmix={float(config['cutmix']):g},"
             f"{'ra' if config['repeated_aug'] else 'no-ra'},cls,{int(config['crop'])}px")
    return f"{label},{config['category']}" if "category" in config else label


def run(ctx: StageContext) -> dict[str, float]:
    """Fine-tune on the stage's dataset, evaluate every epoch, write metrics.json with the best epoch's
    top-1 (and top-5 with at least 5 classes)."""
    stage, config, device = ctx.stage, ctx.config, pick_device()
    kind, data = next(iter(ctx.data.items()))
    precision = resolve_precision(config["precision"], device, stage)
    seed_everything(ctx.seed)

    category = str(config.get("category", "name"))
    train_set = read_transfer_set(kind, data, train=True, transform=finetune_train_transform(config),
                                  inat_category=category)
    val_set = read_transfer_set(kind, data, train=False, transform=eval_transform(config), inat_category=category)
    num_classes = int(train_set.num_classes)
    stray = sorted({t for t in val_set.targets if not 0 <= t < num_classes})
    if stray:
        raise ValueError(f"{stage}: dataset {data}: val labels {stray[:5]} are not among the {num_classes} "
                         "train classes")
    train, val = Indexed(train_set), Indexed(val_set)

    mixup_fn = build_mixup(config, num_classes)
    sampler = train_sampler(train, bool(config["repeated_aug"]), ctx.seed)
    plan = plan_batches(int(config["batch_size"]), 1, len(sampler), mixup=mixup_fn is not None, tag=stage)
    lr = scaled_lr("transfer", config["lr"], plan.global_batch)
    net = build_model(ctx.model, ctx.checkpoint, num_classes, config).to(device)
    workers = int(config["num_workers"])
    train_loader = DataLoader(train, batch_size=plan.per_process, sampler=sampler, drop_last=True, num_workers=workers,
                              pin_memory=torch.cuda.is_available())
    val_loader = make_loader(val, max(1, int(1.5 * plan.per_process)), shuffle=False, num_workers=workers)  # :590
    log(f"[{stage}] {len(train)} train / {len(val)} val images, {num_classes} classes; {len(sampler)} samples per "
        f"process and epoch{' (repeated augmentation)' if config['repeated_aug'] else ''}; global batch "
        f"{plan.global_batch} ({plan.steps_per_epoch} steps/epoch), lr {lr:.3g}; {config['epochs']} epochs; "
        f"device {device}, {precision}")
    history = fit(net, train_loader, val_loader, config=config, plan=plan, mixup_fn=mixup_fn, num_classes=num_classes,
                  num_val=len(val), lr=lr, layer_decay=1.0, per_epoch_schedule=True, precision=precision,
                  device=device, seed=ctx.seed, state_file=ctx.work.path / "checkpoint.pth",
                  fingerprint=ctx.work.digest, tb_dir=ctx.tb_dir, tb_prefix=stage, tag=stage)
    best, last = best_and_last(history)  # earliest best epoch on ties (official "Max accuracy")
    metrics = {"top1": best["top1"], **({"top5": best["top5"]} if num_classes >= 5 else {})}
    intervals, baselines = accuracy_evidence(metrics, val_set.targets, num_classes)
    ctx.write_metrics(
        task="transfer", intervals=intervals, baselines=baselines, dataset=dataset_label(kind, data, num_classes, len(train), len(val)),
        protocol=protocol_label(config, plan.global_batch), metrics=metrics,
        extra={"dataset_kind": kind, "best_epoch": best["epoch"], "best_top1": best["top1"],
               "best_top5": best["top5"], "last_epoch": last["epoch"], "last_top1": last["top1"],
               "last_top5": last["top5"], "history": history, "global_batch": plan.global_batch, "lr_scaled": lr,
               "steps_per_epoch": plan.steps_per_epoch, "samples_per_epoch": len(sampler) * world_size(),
               "precision": precision, "num_classes": num_classes, "num_train": len(train), "num_val": len(val),
               "top5_meaningful": num_classes >= 5})
    log(f"[{stage}] best top-1 {best['top1']:.2f} at epoch {best['epoch']} (last {last['top1']:.2f})")
    return metrics
