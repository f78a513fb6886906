"""The one fine-tuning loop (iBOT ``evaluation/classification_layer_decay`` and ``eval_cls.py``, BEiT/DeiT
recipes, with timm components): end-to-end fine-tuning, transfer learning and semi-supervised
fine-tuning build their model and loaders and train with :func:`fit`.

- model: our backbone (``build_pretrained_backbone(..., drop_path_rate=drop_path)``, built at the
  fine-tuning crop so the positional embeddings are resampled once at load, as the official loader
  does) + ``nn.Linear`` head on the final-norm [CLS] token (``--use_cls``: no mean pooling, no
  fc_norm); head weight trunc-normal(0.02) × ``head_init_scale``, bias 0;
- ``timm.data.Mixup`` (mixup/cutmix, batch mode, label smoothing) + ``timm.loss.SoftTargetCrossEntropy``
  (a batch of odd size is not mixed: smoothed one-hot targets);
- AdamW (``opt_eps``, ``opt_betas``), weight decay except 1-D params, pos_embed and cls_token,
  layer-wise lr decay through ``timm.optim.create_optimizer_v2(..., layer_decay=...)``. The model's
  ``group_matcher`` hands timm the layer ids of :func:`ibot.models.layer_decay.vit_layer_id` (BEiT's
  ``get_num_layer_for_vit``, the rule of the dense stages too): cls_token/pos_embed/patch_embed
  → layer 0, ``blocks.i`` → i + 1, final norm and head → depth + 1, scale
  ``decay ** (depth + 1 - layer_id)`` (timm's own ViT matcher differs: it merges the final norm
  into the last block, scale ``decay``, and puts the head alone on top);
- timm ``CosineLRScheduler``: per iteration with a prefixed warmup (fine-tuning) or per epoch
  (eval_cls.py); fp16 AMP with a grad scaler on GPU (``precision``), or ``deepspeed_fp16``: the official
  ``--enable_deepspeed`` engine (fp16 model, fp32 masters, dynamic loss scale; :mod:`.fp16_master`),
  gradient accumulation, optional clipping; evaluation on val every ``val_freq`` epochs; the reported
  epoch is the best one (the official "Max accuracy"), the last one's numbers kept beside it.

The data order and augmentation seeds of an epoch depend only on ``(seed, epoch, rank)`` and the state
is saved after every epoch, so a resumed run trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from downstream.engine.fp16_master import Fp16MasterOptimizer
from downstream.engine.metrics import evaluate
from downstream.engine.setup import autocast, log, progress, seed_everything
from ibot.checkpoint import BackboneCheckpoint, load_file, save_atomic
from ibot.distributed import all_reduce_sum, barrier, is_main, rank, world_size
from ibot.models.layer_decay import vit_layer_id
from ibot.models.specs import ModelSpec
from ibot.tensorboard import ScalarWriter

__all__ = ["ViTClassifier", "build_model", "build_optimizer", "iteration_scheduler", "epoch_scheduler", "build_mixup",
           "build_criterion", "BatchPlan", "plan_batches", "train_one_epoch", "load_training_state",
           "save_training_state", "EPOCH_TAGS", "epoch_scalars", "fit", "protocol_label"]


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


def build_model(model: ModelSpec, checkpoint: BackboneCheckpoint | None, num_classes: int,
                config: Mapping[str, Any]) -> ViTClassifier:
    """Backbone built at the fine-tuning crop (positional embeddings resampled once at load, as the
    official loader) with ``drop_path``, and the [CLS] head."""
    from ibot.models.pretrained import build_pretrained_backbone
    backbone = build_pretrained_backbone(model, checkpoint, img_size=int(config["crop"]),
                                         drop_path_rate=float(config["drop_path"]))
    return ViTClassifier(backbone, num_classes, float(config["head_init_scale"]))


def build_optimizer(model: nn.Module, config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW with BEiT-style layer-wise lr decay and weight-decay groups (timm ``create_optimizer_v2``)."""
    from timm.optim import create_optimizer_v2
    layer_decay = float(config["layer_decay"])
    return create_optimizer_v2(model, opt=config["opt"], lr=float(config["lr"]),
                               weight_decay=float(config["weight_decay"]),
                               layer_decay=layer_decay if layer_decay < 1.0 else None,
                               eps=float(config["opt_eps"]), betas=tuple(float(b) for b in config["opt_betas"]))


def iteration_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any], steps_per_epoch: int):
    """Per-iteration cosine schedule with linear warmup (timm ``CosineLRScheduler``; ``step_update``):
    run_class_finetuning.py's schedule."""
    from timm.scheduler import CosineLRScheduler
    warmup = int(config["warmup_epochs"]) * steps_per_epoch
    total = int(config["epochs"]) * steps_per_epoch
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=float(config["min_lr"]),
                             warmup_t=warmup, warmup_lr_init=float(config["warmup_lr"]), warmup_prefix=True,
                             t_in_epochs=False, cycle_limit=1)


def epoch_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any]):
    """timm ``create_scheduler`` for ``--sched cosine`` as the official eval_cls.py builds it (transfer
    :695, semi-supervised :787): cosine over ``epochs``, warmup from ``warmup_lr`` not prefixed, floor
    ``min_lr``, one cycle, stepped per epoch (after epoch ``e`` with ``e``: :func:`fit`)."""
    from timm.scheduler import CosineLRScheduler
    return CosineLRScheduler(optimizer, t_initial=int(config["epochs"]), lr_min=float(config["min_lr"]),
                             warmup_t=int(config["warmup_epochs"]), warmup_lr_init=float(config["warmup_lr"]),
                             cycle_limit=1, t_in_epochs=True)


def build_mixup(config: Mapping[str, Any], num_classes: int):
    """timm ``Mixup`` (None when mixup and cutmix are both off)."""
    from timm.data import Mixup
    if float(config["mixup"]) <= 0 and float(config["cutmix"]) <= 0:
        return None
    return Mixup(mixup_alpha=float(config["mixup"]), cutmix_alpha=float(config["cutmix"]),
                 prob=float(config["mixup_prob"]), switch_prob=float(config["mixup_switch_prob"]),
                 mode=config["mixup_mode"], label_smoothing=float(config["smoothing"]), num_classes=num_classes)


def build_criterion(config: Mapping[str, Any], mixup_fn) -> nn.Module:
    """Soft-target CE under mixup/cutmix, else label-smoothing CE, else plain CE (official choice)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if float(config["smoothing"]) > 0:
        return LabelSmoothingCrossEntropy(float(config["smoothing"]))
    return nn.CrossEntropyLoss()


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
    # deepspeed_fp16: fp16 model fed fp16 images without autocast (engine_for_finetuning.py:70-73)
    fp16_master = isinstance(optimizer, Fp16MasterOptimizer)
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
        if fp16_master:
            images = images.half()  # after mixup, as the official loop (:67-71)
        with contextlib.nullcontext() if fp16_master else autocast(precision, device):
            loss = criterion(module(images), soft)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{tag}: loss is {float(loss.detach())} at epoch {epoch + 1}, step {step}")
        if fp16_master:  # DeepSpeed model.backward / model.step (engine_for_finetuning.py:85-88)
            optimizer.backward(loss / accum)
            if (step + 1) % accum == 0:
                optimizer.step()  # skipped (scale halved) on an inf/nan gradient
                optimizer.zero_grad()
        else:
            scaler.scale(loss / accum).backward()
            if (step + 1) % accum == 0:
                if config["clip_grad"]:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(net.parameters(), float(config["clip_grad"]))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
        count += 1
    return float(all_reduce_sum(loss_sum.clone()) / max(1, count * world_size()))


def load_training_state(state_file: Path, net: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                        device: torch.device, tag: str) -> tuple[int, list[dict[str, Any]]]:
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
    tagged ``<stage>/...``."""
    return {f"{stage}/{tag}": float(record[key]) for key, tag in EPOCH_TAGS.items() if key in record}


def fit(net: nn.Module, train_loader, val_loader, *, config: Mapping[str, Any], plan: BatchPlan, mixup_fn,
        num_classes: int, num_val: int, lr: float, layer_decay: float, per_epoch_schedule: bool, precision: str,
        device: torch.device, seed: int, state_file: Path, fingerprint: str, tb_dir: str | Path, tb_prefix: str,
        tag: str) -> list[dict[str, Any]]:
    """Train ``net`` for ``config['epochs']`` epochs from the last state in ``state_file``, evaluate on val
    every ``val_freq`` epochs (and after the last); returns the history of epoch records.

    AdamW with weight-decay groups and layer decay (``layer_decay`` < 1) at peak ``lr``; the schedule is
    per iteration (fine-tuning, run_class_finetuning.py) or, with ``per_epoch_schedule``, per epoch and
    stepped after epoch ``e`` with ``e`` as the official eval_cls.py does (transfer :768, semi-supervised
    :860): the first epoch runs at the scheduler's initial value. ``precision`` ``deepspeed_fp16`` halves
    ``net`` and wraps the optimizer in :class:`Fp16MasterOptimizer`. The state (model, optimizer with its
    fp32 masters and loss scale, scaler, history) is saved atomically after every epoch; the curves go to
    ``tb_dir`` as ``<tb_prefix>/...``.
    """
    epochs = int(config["epochs"])
    if precision == "deepspeed_fp16":
        net.half()  # DeepSpeed's fp16 engine casts the whole module, LayerNorm included
    optimizer = build_optimizer(net, {**config, "lr": lr, "layer_decay": layer_decay})
    if precision == "deepspeed_fp16":
        # the official ds config (utils.py:496-501) sets no gradient_clipping, so --clip_grad (default None,
        # run_class_finetuning.py:82) never clips there; a clip_grad set here clips the unscaled fp32 grads
        optimizer = Fp16MasterOptimizer(optimizer, clip_grad=float(config["clip_grad"] or 0.0))
    scheduler = (epoch_scheduler(optimizer, config) if per_epoch_schedule
                 else iteration_scheduler(optimizer, config, plan.steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=(precision == "fp16"))
    module: nn.Module = net
    if world_size() > 1:
        module = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = build_criterion(config, mixup_fn)
    start_epoch, history = load_training_state(state_file, net, optimizer, scaler, device, tag=tag)
    tb = ScalarWriter(tb_dir, resume_step=start_epoch + 1)
    for epoch in range(start_epoch, epochs):
        def per_iteration(update: int, epoch: int = epoch) -> None:
            scheduler.step_update(num_updates=epoch * plan.steps_per_epoch + update)

        if per_epoch_schedule and epoch > 0:
            scheduler.step(epoch - 1)
        train_loss = train_one_epoch(module, net, train_loader, optimizer, scaler, criterion, mixup_fn, plan=plan,
                                     epoch=epoch, epochs=epochs, num_classes=num_classes, config=config,
                                     precision=precision, device=device, seed=seed,
                                     on_update=None if per_epoch_schedule else per_iteration, tag=tag)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": max(g["lr"] for g in optimizer.param_groups)}
        if (epoch + 1) % max(1, int(config["val_freq"])) == 0 or epoch == epochs - 1:
            record.update(evaluate(net, val_loader, num_val, device, precision, desc=f"{tag} val"))
            log(f"[{tag}] epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, val top-1 {record['top1']:.2f}, "
                f"top-5 {record['top5']:.2f}")
        history.append(record)
        tb.add(epoch_scalars(record, tb_prefix), epoch + 1)
        save_training_state(state_file, fingerprint, epoch + 1, net, optimizer, scaler, history)
    tb.close()
    return history


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, from its config (the results join the paper's numbers only to the paper's
    protocol, e.g. ``200ep,layer_decay=0.75,drop_path=0.1,mixup=0.8,cutmix=1,cls,224px`` for ViT-S/16)."""
    return (f"{int(config['epochs'])}ep,layer_decay={float(config['layer_decay']):g},"
            f"drop_path={float(config['drop_path']):g},mixup={float(config['mixup']):g},"
            f"cutmix={float(config['cutmix']):g},cls,{int(config['crop'])}px")
