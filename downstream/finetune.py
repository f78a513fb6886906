"""End-to-end fine-tuning on ImageNet (iBOT ``evaluation/classification_layer_decay``, BEiT recipe).

What the official run does (``run.sh imagenet_cls``: ``run_class_finetuning.py --use_cls
--layer_scale_init_value 0 --abs_pos_emb --disable_rel_pos_bias --imagenet_default_mean_and_std
--mixup 0.8 --cutmix 1.0 --warmup_epochs 20``) and how it is done here, with timm components:

- model: our backbone (``build_pretrained_backbone(..., drop_path_rate=drop_path)``, built at the
  fine-tuning crop so the positional embeddings are resampled once at load, as the official loader
  does) + ``nn.Linear`` head on the final-norm [CLS] token (``--use_cls``: no mean pooling, no
  fc_norm); head weight trunc-normal(0.02) × ``head_init_scale`` (0.001), bias 0;
- data: ``timm.data.create_transform`` (RandomResizedCrop bicubic, flip, colour jitter 0.4,
  RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 pixel mode, ImageNet mean/std); eval
  ``Resize(resize=crop/0.875, bilinear)`` + ``CenterCrop(crop)`` (the official eval transform);
- ``timm.data.Mixup`` (mixup 0.8, cutmix 1.0, prob 1, switch 0.5, batch mode, label smoothing 0.1)
  + ``timm.loss.SoftTargetCrossEntropy`` (a batch of odd size is not mixed: smoothed one-hot targets);
- AdamW (eps 1e-8, betas 0.9/0.999), weight decay 0.05 except 1-D params, pos_embed and cls_token,
  layer-wise lr decay through ``timm.optim.create_optimizer_v2(..., layer_decay=...)``. The model's
  ``group_matcher`` hands timm the layer ids of :func:`ibot.models.layer_decay.vit_layer_id` (BEiT's
  ``get_num_layer_for_vit``, the rule of the dense stages too): cls_token/pos_embed/patch_embed
  → layer 0, ``blocks.i`` → i + 1, final norm and head → depth + 1, scale
  ``decay ** (depth + 1 - layer_id)`` (timm's own ViT matcher differs: it merges the final norm
  into the last block, scale ``decay``, and puts the head alone on top);
- ``timm.scheduler.CosineLRScheduler`` updated every iteration: linear warmup from 0 over
  ``warmup_epochs``, cosine to ``min_lr`` 1e-6 (lr × each group's ``lr_scale``);
- global batch 1024 (official 128 per GPU × 8; ViT-L 64 × 8 × 2 accumulation), lr 4e-3 (the
  script default; the README commands pass no ``--lr``), not rescaled with the batch; fp16 AMP with a
  grad scaler on GPU (``precision``), no gradient clipping, no EMA;
- evaluation on val after every epoch; reported ``top1``/``top5`` are those of the best epoch
  (the official "Max accuracy"), the last epoch's are in ``extra``.

Paper recipes: ViT-S/16 200 epochs, drop path 0.1, layer decay 0.75, warmup 20 (DEFAULTS);
ViT-B/16 100 epochs, 0.2, 0.65, warmup 20; ViT-L/16 50 epochs, 0.4, 0.75, warmup 5 (see the schema).

Training state is checkpointed atomically after every epoch in ``<out dir>/work/checkpoint.pth``;
a rerun (or a submitit requeue) resumes from it when config, weights and data are unchanged. Live
TensorBoard curves in ``<out dir>/tb/`` (:func:`epoch_scalars`, step = epochs done).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision import transforms

from downstream.cli import stage_main
from downstream.features import (IMAGENET_MEAN, IMAGENET_STD, autocast, dataset_label, eval_transform,
                                 gather_correct, image_folder, log, make_loader,
                                 pick_device, progress, seed_everything, topk_correct)
from ibot.checkpoint import load_file, save_atomic
from ibot.distributed import all_reduce_sum, barrier, init_distributed, is_main, rank, world_size
from ibot.metrics import write_metrics
from ibot.tensorboard import ScalarWriter
from ibot.models.layer_decay import vit_layer_id
from ibot.workdir import prepare_stage_work
from ibot.stages import stage_defaults

__all__ = ["DEFAULTS", "protocol_label", "ViTClassifier", "build_model", "build_optimizer", "build_scheduler",
           "build_mixup", "build_criterion", "train_transform", "BatchPlan", "plan_batches", "train_one_epoch",
           "evaluate", "load_training_state", "save_training_state", "best_and_last", "EPOCH_TAGS",
           "epoch_scalars", "run", "main"]

#: Paper defaults (ViT-S/16 fine-tuning recipe): workflow/schemas/finetune.schema.yaml, the one source.
DEFAULTS: dict[str, Any] = stage_defaults("finetune")

# -- model ----------------------------------------------------------------------------------------
class ViTClassifier(nn.Module):
    """Backbone + linear head on the final-norm [CLS] token (official ``--use_cls``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_init_scale: float = 0.001) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images)[:, 0])

    @property
    def num_layers(self) -> int:
        """BEiT's ``num_layers`` for layer decay: depth + 1 (embeddings + blocks; norm/head on top)."""
        return len(self.backbone.blocks) + 1

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's layer grouping: a parameter name -> its BEiT layer id (:func:`vit_layer_id`).

        timm (``param_groups_layer_decay``) sorts these ids into layers 0..depth+1, every id being
        used, and scales layer ``i`` by ``decay ** (depth + 1 - i)``: the official rule exactly.
        """
        depth = len(self.backbone.blocks)
        return lambda name: vit_layer_id(name, depth, prefix="backbone.")

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}


def build_model(model_spec: Mapping[str, Any], checkpoint: str | None, checkpoint_key: str | None,
                num_classes: int, config: Mapping[str, Any]) -> ViTClassifier:
    from ibot.models.pretrained import build_pretrained_backbone
    backbone = build_pretrained_backbone(model_spec, checkpoint, checkpoint_key=checkpoint_key,
                                         img_size=int(config["crop"]), drop_path_rate=float(config["drop_path"]))
    return ViTClassifier(backbone, num_classes, float(config["head_init_scale"]))


def build_optimizer(model: nn.Module, config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW with BEiT-style layer-wise lr decay and weight-decay groups (timm ``create_optimizer_v2``)."""
    from timm.optim import create_optimizer_v2
    layer_decay = float(config["layer_decay"])
    return create_optimizer_v2(model, opt=config["opt"], lr=float(config["lr"]),
                               weight_decay=float(config["weight_decay"]),
                               layer_decay=layer_decay if layer_decay < 1.0 else None,
                               eps=float(config["opt_eps"]), betas=tuple(float(b) for b in config["opt_betas"]))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any], steps_per_epoch: int):
    """Per-iteration cosine schedule with linear warmup (timm ``CosineLRScheduler``; ``step_update``)."""
    from timm.scheduler import CosineLRScheduler
    warmup = int(config["warmup_epochs"]) * steps_per_epoch
    total = int(config["epochs"]) * steps_per_epoch
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=float(config["min_lr"]),
                             warmup_t=warmup, warmup_lr_init=float(config["warmup_lr"]), warmup_prefix=True,
                             t_in_epochs=False, cycle_limit=1)


def build_mixup(config: Mapping[str, Any], num_classes: int):
    """timm ``Mixup`` (None when mixup and cutmix are both off)."""
    from timm.data import Mixup
    if float(config["mixup"]) <= 0 and float(config["cutmix"]) <= 0:
        return None
    return Mixup(mixup_alpha=float(config["mixup"]), cutmix_alpha=float(config["cutmix"]),
                 prob=float(config["mixup_prob"]), switch_prob=float(config["mixup_switch_prob"]),
                 mode=config["mixup_mode"], label_smoothing=float(config["smoothing"]), num_classes=num_classes)


def train_transform(config: Mapping[str, Any]):
    """timm ``create_transform(is_training=True)`` with the official arguments."""
    from timm.data import create_transform
    transform = create_transform(
        input_size=int(config["crop"]), is_training=True, color_jitter=float(config["color_jitter"]),
        auto_augment=config["auto_augment"], interpolation=config["train_interpolation"],
        re_prob=float(config["re_prob"]), re_mode=config["re_mode"], re_count=int(config["re_count"]),
        mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if int(config["crop"]) <= 32:  # official build_transform: small inputs use RandomCrop(padding=4)
        transform.transforms[0] = transforms.RandomCrop(int(config["crop"]), padding=4)
    return transform


def build_criterion(config: Mapping[str, Any], mixup_fn) -> nn.Module:
    """Soft-target CE under mixup/cutmix, else label-smoothing CE, else plain CE (official choice)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if float(config["smoothing"]) > 0:
        return LabelSmoothingCrossEntropy(float(config["smoothing"]))
    return nn.CrossEntropyLoss()


# -- training loop (shared with downstream.transfer) ------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """How one epoch is cut: images per process and step, accumulation, updates per epoch."""

    per_process: int
    accum: int
    global_batch: int
    steps_per_epoch: int


def plan_batches(batch_size: int, accum_steps: int, samples_per_process: int, *, mixup: bool,
                 tag: str) -> BatchPlan:
    """Split the global ``batch_size`` over processes and accumulation steps.

    ``samples_per_process``: what one process's sampler yields per epoch. Tiny datasets (embedded
    runs) get at least one update per epoch: the batch shrinks to the shard (even under mixup,
    which pairs samples) and the accumulation to what the shard holds.
    """
    accum = max(1, int(accum_steps))
    per_process = max(1, int(batch_size) // (world_size() * accum))
    if per_process > samples_per_process:
        per_process = max(1, samples_per_process)
        if mixup and per_process > 1:
            per_process -= per_process % 2
        log(f"[{tag}] batch_size {batch_size} exceeds the data: using {per_process} per process")
    accum = max(1, min(accum, samples_per_process // per_process))  # an epoch must hold at least one full update
    return BatchPlan(per_process=per_process, accum=accum, global_batch=per_process * world_size() * accum,
                     steps_per_epoch=max(1, samples_per_process // per_process // accum))


def train_one_epoch(module: nn.Module, net: nn.Module, loader, optimizer: torch.optim.Optimizer, scaler,
                    criterion: nn.Module, mixup_fn, *, plan: BatchPlan, epoch: int, epochs: int, num_classes: int,
                    config: Mapping[str, Any], precision: str, device: torch.device, seed: int,
                    on_update: Callable[[int], None] | None = None, tag: str = "finetune") -> float:
    """One epoch of mixup/cutmix training with AMP and gradient accumulation; the mean train loss.

    The data order and augmentation seeds depend only on ``(seed, epoch, rank)``, so a resumed run
    trains exactly as an uninterrupted one. ``on_update(u)`` is called before the ``u``-th update
    of the epoch (a per-iteration lr schedule); ``module`` is ``net`` or its DDP wrapper.
    """
    from timm.data.mixup import mixup_target

    loader.sampler.set_epoch(epoch)
    seed_everything(seed + 1000 * epoch + rank())
    module.train()
    accum = plan.accum
    loss_sum, count = torch.zeros((), device=device), 0
    optimizer.zero_grad(set_to_none=True)
    batches = progress(loader, desc=f"{tag} epoch {epoch + 1}/{epochs}",
                       total=min(len(loader), plan.steps_per_epoch * accum))
    for step, (images, targets, _) in enumerate(batches):
        update = step // accum
        if update >= plan.steps_per_epoch:
            break
        if step % accum == 0 and on_update is not None:
            on_update(update)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None and len(images) % 2 == 0:
            images, soft = mixup_fn(images, targets)
        elif mixup_fn is not None:  # odd batch: cannot pair samples; smoothed one-hot targets
            soft = mixup_target(targets, num_classes, lam=1.0, smoothing=float(config["smoothing"]))
        else:
            soft = targets
        with autocast(precision, device):
            loss = criterion(module(images), soft)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{tag}: loss is {float(loss.detach())} at epoch {epoch + 1}, step {step}")
        scaler.scale(loss / accum).backward()
        if (step + 1) % accum == 0:
            if config["clip_grad"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), float(config["clip_grad"]))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        count += 1
    return float(all_reduce_sum(loss_sum.clone()) / max(1, count * world_size()))


def load_training_state(state_file: Path, net: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                        device: torch.device, tag: str = "finetune") -> tuple[int, list[dict[str, Any]]]:
    """Restore model/optimizer/scaler from ``state_file`` if it exists: ``(epochs done, history)``."""
    if not state_file.is_file():
        return 0, []
    state = load_file(state_file, map_location=device)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    log(f"[{tag}] resuming from {state_file} after epoch {int(state['epoch'])}")
    return int(state["epoch"]), list(state["history"])


def save_training_state(state_file: Path, digest: str, epoch: int, net: nn.Module,
                        optimizer: torch.optim.Optimizer, scaler, history: list[dict[str, Any]]) -> None:
    """Atomic end-of-epoch checkpoint (main process), tagged with the work fingerprint."""
    if is_main():
        save_atomic({"fingerprint": digest, "epoch": epoch, "model": net.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "history": history},
                    state_file)
    barrier()


#: TensorBoard tag (after the stage prefix) of each epoch-record key (``evaluate``'s keys exist on
#: evaluated epochs only).
EPOCH_TAGS = {"train_loss": "train_loss", "lr": "lr", "top1": "val_top1", "top5": "val_top5", "loss": "val_loss"}


def epoch_scalars(record: Mapping[str, Any], stage: str = "finetune") -> dict[str, float]:
    """The TensorBoard scalars of one epoch record (train loss, lr; val top-1/top-5/loss if evaluated),
    tagged ``<stage>/...`` (fine-tuning, and the transfer stages that reuse its loop)."""
    return {f"{stage}/{tag}": float(record[key]) for key, tag in EPOCH_TAGS.items() if key in record}


def best_and_last(history: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The best evaluated epoch (earliest on ties: the official "Max accuracy") and the last one."""
    evaluated = [r for r in history if "top1" in r]
    return max(evaluated, key=lambda r: r["top1"]), evaluated[-1]


# -- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, num_samples: int, device: torch.device, precision: str,
             desc: str = "finetune val") -> dict[str, float]:
    """Top-1/top-5 (percent) and mean cross-entropy on the whole val set (exact under DDP padding)."""
    model.eval()
    rows, indices = [], []
    for images, targets, index in progress(loader, desc=desc):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(images)
        logits = logits.float()
        loss = nn.functional.cross_entropy(logits, targets, reduction="none")
        rows.append(torch.cat([topk_correct(logits, targets, (1, 5)).float(), loss[:, None]], dim=1))
        indices.append(index.to(device))
    per_sample = gather_correct(torch.cat(rows), torch.cat(indices), num_samples).double().mean(dim=0)
    return {"top1": 100.0 * float(per_sample[0]), "top5": 100.0 * float(per_sample[1]), "loss": float(per_sample[2])}


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, from its config (the results join the paper's numbers only to the paper's
    protocol, e.g. ``200ep,layer_decay=0.75,drop_path=0.1,mixup=0.8,cutmix=1,cls,224px`` for ViT-S/16)."""
    return (f"{int(config['epochs'])}ep,layer_decay={float(config['layer_decay']):g},"
            f"drop_path={float(config['drop_path']):g},mixup={float(config['mixup']):g},"
            f"cutmix={float(config['cutmix']):g},cls,{int(config['crop'])}px")


# -- the stage --------------------------------------------------------------------------------------
def run(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
        checkpoint_key: str | None, data: str, out: str, run: str, model: str, seed: int) -> dict[str, float]:
    """Stage entry (inside the launched job): fine-tune, evaluate every epoch, write metrics.json."""
    if config.get("lrs"):
        raise ValueError(f"finetune.lrs {config['lrs']}: the sweep is run by the workflow (one job per value, "
                         "ibot.sweep picks the best); one fine-tuning job takes one finetune.lr")
    init_distributed()
    started = time.time()
    out_path = Path(out)
    work = out_path.parent / "work"
    device = pick_device()
    precision = config["precision"]
    if precision == "fp16" and device.type != "cuda":
        log("[finetune] precision fp16 needs a GPU: running in fp32 on CPU")
        precision = "fp32"
    seed_everything(seed)

    train_set = image_folder(data, "train", train_transform(config))
    val_set = image_folder(data, "val", eval_transform(config["resize"], config["crop"], config["eval_interpolation"]))
    if train_set.classes != val_set.classes:
        raise ValueError(f"dataset {data}: train/ and val/ have different class folders")
    num_classes = len(train_set.classes)

    mixup_fn = build_mixup(config, num_classes)
    plan = plan_batches(int(config["batch_size"]), int(config["accum_steps"]), len(train_set) // world_size(),
                        mixup=mixup_fn is not None, tag="finetune")
    per_process, global_batch, steps_per_epoch = plan.per_process, plan.global_batch, plan.steps_per_epoch
    epochs = int(config["epochs"])

    net = build_model(model_spec, checkpoint, checkpoint_key, num_classes, config).to(device)
    optimizer = build_optimizer(net, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=(precision == "fp16"))
    module: nn.Module = net
    if world_size() > 1:
        module = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = build_criterion(config, mixup_fn)
    train_loader = make_loader(train_set, per_process, shuffle=True, seed=seed, drop_last=True,
                               num_workers=int(config["num_workers"]))
    val_loader = make_loader(val_set, per_process, shuffle=False, num_workers=int(config["num_workers"]))
    log(f"[finetune] {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; global batch "
        f"{global_batch} ({steps_per_epoch} steps/epoch); {epochs} epochs; layer decay {config['layer_decay']} "
        f"over {net.num_layers} layers; device {device}, {precision}")

    # -- resume (only work made for this exact setup: ibot.workdir) ------------------------------------
    work = prepare_stage_work("finetune", work, config=config, model_spec=model_spec, checkpoint=checkpoint,
                              data={"imagenet": data}, seed=seed)
    state_file = work.path / "checkpoint.pth"
    start_epoch, history = load_training_state(state_file, net, optimizer, scaler, device)
    tb = ScalarWriter(out_path.parent / "tb", resume_step=start_epoch + 1)

    for epoch in range(start_epoch, epochs):
        def per_iteration(update: int, epoch: int = epoch) -> None:
            scheduler.step_update(num_updates=epoch * steps_per_epoch + update)

        train_loss = train_one_epoch(module, net, train_loader, optimizer, scaler, criterion, mixup_fn, plan=plan,
                                     epoch=epoch, epochs=epochs, num_classes=num_classes, config=config,
                                     precision=precision, device=device, seed=seed, on_update=per_iteration)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": max(g["lr"] for g in optimizer.param_groups)}
        if (epoch + 1) % max(1, int(config["val_freq"])) == 0 or epoch == epochs - 1:
            record.update(evaluate(net, val_loader, len(val_set), device, precision))
            log(f"[finetune] epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, val top-1 {record['top1']:.2f}, "
                f"top-5 {record['top5']:.2f}")
        history.append(record)
        tb.add(epoch_scalars(record), epoch + 1)
        save_training_state(state_file, work.digest, epoch + 1, net, optimizer, scaler, history)
    tb.close()

    metrics: dict[str, float] = {}
    if is_main():
        best, last = best_and_last(history)  # earliest best epoch on ties (official "Max accuracy")
        metrics = {"top1": best["top1"]}
        if num_classes >= 5:
            metrics["top5"] = best["top5"]
        write_metrics(
            out, run=run, model=model, stage="finetune", task="finetune", dataset=dataset_label(data, num_classes),
            protocol=protocol_label(config),
            metrics=metrics, config=config, wall_time_s=time.time() - started, checkpoint=checkpoint,
            extra={"fingerprint": work.digest, "best_epoch": best["epoch"], "best_top1": best["top1"], "best_top5": best["top5"],
                   "last_epoch": last["epoch"], "last_top1": last["top1"], "last_top5": last["top5"],
                   "history": history, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
                   "num_layers": net.num_layers, "precision": precision, "num_classes": num_classes,
                   "num_train": len(train_set), "num_val": len(val_set),
                   "top5_meaningful": num_classes >= 5})
        log(f"[finetune] best top-1 {best['top1']:.2f} at epoch {best['epoch']} (last {last['top1']:.2f}); "
            f"wrote {out_path}")
    barrier()
    return metrics


def main(argv: Sequence[str] | None = None) -> Any:
    return stage_main("finetune", "downstream.finetune:run", DEFAULTS, argv,
                      description="End-to-end fine-tuning with layer-wise lr decay (iBOT/BEiT recipe, timm).")


if __name__ == "__main__":
    main()
