"""End-to-end fine-tuning on ImageNet (iBOT ``evaluation/classification_layer_decay``, BEiT recipe; Tab. 2).

What the official run does (``run.sh imagenet_cls``: ``run_class_finetuning.py --use_cls
--layer_scale_init_value 0 --abs_pos_emb --disable_rel_pos_bias --imagenet_default_mean_and_std
--mixup 0.8 --cutmix 1.0 --warmup_epochs 20``) and how it is done here (the loop:
:mod:`downstream.engine.finetune`):

- data: ``timm.data.create_transform`` (RandomResizedCrop bicubic, flip, colour jitter 0.4,
  RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 pixel mode, ImageNet mean/std); eval
  ``Resize(resize=crop/0.875, bilinear)`` + ``CenterCrop(crop)`` (the official eval transform);
- mixup 0.8, cutmix 1.0, prob 1, switch 0.5, batch mode, label smoothing 0.1; head init scale 0.001;
- AdamW (eps 1e-8, betas 0.9/0.999), weight decay 0.05, layer-wise lr decay; per-iteration cosine
  schedule with linear warmup from 0 over ``warmup_epochs`` to ``min_lr`` 1e-6;
- global batch 1024 (official 128 per GPU × 8; ViT-L 64 × 8 × 2 accumulation), lr 4e-3 (the
  script default; the README commands pass no ``--lr``), not rescaled with the batch
  (run_class_finetuning.py:589); fp16 AMP with a grad scaler on GPU, no gradient clipping, no EMA;
- evaluation on val after every epoch; reported ``top1``/``top5`` are those of the best epoch
  (the official "Max accuracy"), the last epoch's are in ``extra``.

Paper recipes: ViT-S/16 200 epochs, drop path 0.1, layer decay 0.75, warmup 20 (the schema defaults);
ViT-B/16 100 epochs, 0.2, 0.65, warmup 20; ViT-L/16 50 epochs, 0.4, 0.75, warmup 5 (the recipes).
The lr sweep (``finetune.lrs``) is one job per value (:mod:`ibot.sweep`).
"""

from __future__ import annotations

from downstream.engine.data import (dataset_label, eval_transform, finetune_train_transform, make_loader,
                                    train_val_folders)
from downstream.engine.finetune import build_mixup, build_model, fit, plan_batches, protocol_label
from downstream.engine.metrics import best_and_last
from downstream.engine.setup import log, pick_device, resolve_precision, seed_everything
from ibot.distributed import world_size
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_evidence

__all__ = ["run"]


def run(ctx: StageContext) -> dict[str, float]:
    """Fine-tune, evaluate every epoch, write metrics.json with the best epoch."""
    config, data, device = ctx.config, ctx.data_root, pick_device()
    precision = resolve_precision(config["precision"], device, "finetune")
    seed_everything(ctx.seed)
    val_transform = eval_transform(config["resize"], config["crop"], config["eval_interpolation"])
    train_set, val_set = train_val_folders(data, finetune_train_transform(config), val_transform)
    num_classes = len(train_set.classes)
    mixup_fn = build_mixup(config, num_classes)
    plan = plan_batches(int(config["batch_size"]), int(config["accum_steps"]), len(train_set) // world_size(),
                        mixup=mixup_fn is not None, tag="finetune")
    net = build_model(ctx.model, ctx.checkpoint, num_classes, config).to(device)
    workers = int(config["num_workers"])
    train_loader = make_loader(train_set, plan.per_process, shuffle=True, seed=ctx.seed, drop_last=True,
                               num_workers=workers)
    val_loader = make_loader(val_set, plan.per_process, shuffle=False, num_workers=workers)
    log(f"[finetune] {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; global batch "
        f"{plan.global_batch} ({plan.steps_per_epoch} steps/epoch); {config['epochs']} epochs; layer decay "
        f"{config['layer_decay']} over {net.num_layers} layers; device {device}, {precision}")
    history = fit(net, train_loader, val_loader, config=config, plan=plan, mixup_fn=mixup_fn, num_classes=num_classes,
                  num_val=len(val_set), lr=float(config["lr"]), layer_decay=float(config["layer_decay"]),
                  per_epoch_schedule=False, precision=precision, device=device, seed=ctx.seed,
                  state_file=ctx.work.path / "checkpoint.pth", fingerprint=ctx.work.digest, tb_dir=ctx.tb_dir,
                  tb_prefix="finetune", tag="finetune")
    best, last = best_and_last(history)  # earliest best epoch on ties (official "Max accuracy")
    metrics = {"top1": best["top1"], **({"top5": best["top5"]} if num_classes >= 5 else {})}
    intervals, baselines = accuracy_evidence(metrics, val_set.targets, num_classes)
    ctx.write_metrics(
        task="finetune", dataset=dataset_label(data, num_classes), protocol=protocol_label(config), metrics=metrics,
        intervals=intervals, baselines=baselines,
        extra={"best_epoch": best["epoch"], "best_top1": best["top1"], "best_top5": best["top5"],
               "last_epoch": last["epoch"], "last_top1": last["top1"], "last_top5": last["top5"],
               "history": history, "global_batch": plan.global_batch, "steps_per_epoch": plan.steps_per_epoch,
               "num_layers": net.num_layers, "precision": precision, "num_classes": num_classes,
               "num_train": len(train_set), "num_val": len(val_set), "top5_meaningful": num_classes >= 5})
    log(f"[finetune] best top-1 {best['top1']:.2f} at epoch {best['epoch']} (last {last['top1']:.2f})")
    return metrics
