"""iBOT pretraining loop (official ``main_ibot.py`` semantics, resumable, DDP-aware).

Equivalent to the official step, with the waste removed (same loss values):
- the student head projects only [CLS] and *masked* patch tokens of the global crops, and only
  [CLS] of the local crops (the official code projects every token, most of them unused);
- the teacher head projects [CLS], the masked patch tokens (targets) and the per-image mean patch
  feature (its linear output layer gives the mean patch logits exactly, for ``center2``);
- crops of equal size are batched through the backbone; attention uses timm's fused SDPA.

Exact resume: data randomness is a function of (seed, epoch, index), global batches are a
function of (seed, epoch), and checkpoints (written atomically every epoch) hold the model, the
optimizer, the loss centres, the scaler and the RNG states, so a killed run that resumes ends
with bit-identical weights on CPU.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from ibot import distributed as dist_utils
from ibot.checkpoint import (HEAD_SETTINGS, CheckpointError, check_state_dict, export_backbone, export_heads,
                             load_file, save_atomic)
from ibot.data.multicrop import MultiCropMaskedDataset, PendingViews, collate_multicrop
from ibot.loss import IBOTLoss
from ibot.run.context import StageContext
from ibot.io import write_csv_atomic, write_text_atomic
from ibot.models.head import build_head, loss_patch_out_dim
from ibot.config import scaled_lr
from ibot.models.specs import ModelSpec
from ibot.models.vision_transformer import build_backbone
from ibot.tokenizers import build_mim_tokenizer, check_mim_heads
from ibot.train.schedules import (cancel_last_layer_gradients, clip_gradients_per_param, cosine_schedule,
                                  param_groups)

__all__ = ["IBOTModel", "GlobalBatchSampler", "run", "select_attention_kernel", "train", "epoch_marks",
           "peak_memory", "max_peak_memory", "TIME_MARKS"]

#: Epochs at which the paper reports pretraining wall-clock (Tab.19 T100/T300/T800, arXiv:2111.07832v3):
#: a run records its cumulative hours at each one it reaches (``train_hours_<mark>ep``).
TIME_MARKS = (100, 300, 800)
GIB = 2 ** 30  # memory unit of ``peak_memory_gb``: GiB, as torch.cuda.max_memory_allocated / 1024^3


class IBOTModel(nn.Module):
    """Backbone + iBOT head; ``forward_*`` methods return only the logits the loss consumes."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, globals_: Tensor, locals_: Tensor | None, masks: Tensor | None, teacher: bool = False
                ) -> dict[str, Tensor]:
        """``globals_`` [G*B,3,H,W] (masks [G*B,h,w] for the student), ``locals_`` [L*B,3,h,w] or None.

        Student: cls [G*B,K], patch logits of masked tokens [M,P], local cls [L*B,K].
        Teacher: cls [G*B,K], patch logits of masked tokens [M,P] (targets), mean patch logits [G*B,P].
        """
        tokens = self.backbone(globals_, mask=None if teacher else masks)
        flat_mask = masks.flatten(1)
        out = {"cls": self.head.forward_cls(tokens[:, 0]),
               "patch": self.head.forward_patch(tokens[:, 1:][flat_mask])}
        if teacher:
            out["patch_mean"] = self.head.forward_patch_mean(tokens[:, 1:])
        elif locals_ is not None:
            out["local_cls"] = self.head.forward_cls(self.backbone(locals_)[:, 0])
        return out


class GlobalBatchSampler(Sampler[int]):
    """Each rank reads its contiguous slice of every global batch of a seeded per-epoch permutation.

    Global batches (and thus the arithmetic of a step) are the same for any number of processes:
    a 2-process run equals a 1-process run with the same global batch. Incomplete batches dropped.
    """

    def __init__(self, length: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if length < global_batch:
            raise ValueError(f"dataset has {length} images, fewer than one global batch ({global_batch})")
        self.length, self.global_batch, self.rank, self.world_size, self.seed = length, global_batch, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps(self) -> int:
        return self.length // self.global_batch

    def __len__(self) -> int:
        return self.steps * (self.global_batch // self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        local = self.global_batch // self.world_size
        for step in range(self.steps):
            start = step * self.global_batch + self.rank * local
            yield from order[start:start + local].tolist()


def epoch_marks(epochs: int, marks: tuple[int, ...] = TIME_MARKS) -> list[int]:
    """The marks a run of ``epochs`` epochs reaches (T100/T300/T800 of Tab.19 for an 800-epoch run)."""
    return [mark for mark in marks if mark <= epochs]


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this process, maximum over the processes (all-reduce max), in GiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (what the official MetricLogger's "max mem" shows; the
    paper's Tab.19 GB) and ``max_memory_reserved`` (the caching allocator's pool). CPU: the process's
    peak resident set (``ru_maxrss``, kB on Linux), a different quantity: ``memory_kind`` tells them apart
    so that tables never mix them silently. Scope: this process, i.e. the last (resumed) session."""
    if device.type == "cuda":
        values = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                              dtype=torch.float64, device=device)
        allocated, reserved = dist_utils.all_reduce_max(values).tolist()
        return {"memory_kind": "cuda_max_allocated", "peak_memory_gb": allocated / GIB,
                "max_memory_reserved_gb": reserved / GIB}
    import resource

    rss = torch.tensor([float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024], dtype=torch.float64)
    return {"memory_kind": "cpu_peak_rss", "peak_memory_gb": dist_utils.all_reduce_max(rss).item() / GIB}


def _precision(cfg: Mapping[str, Any], device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    choice = cfg["precision"]
    if choice == "auto":  # the official meaning of use_fp16: fp16 + GradScaler, or fp32 (ViT-L recipe)
        choice = "fp16" if cfg["use_fp16"] and device.type == "cuda" else "fp32"
    elif choice == "bf16_if_native":
        choice = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if choice == "fp32":
        return None, False
    if choice == "bf16":
        return torch.bfloat16, False
    if choice == "fp16":
        return torch.float16, device.type == "cuda"
    raise ValueError(f"pretrain.precision: {choice!r}; expected auto, fp32, bf16 or fp16")


def check_global_batch(cfg: Mapping[str, Any], global_batch: int) -> bool:
    """Whether this run's global batch departs from the recipe's ``global_batch_size`` (allowed only
    with ``batch_rescale``; the workflow checks the same before any job, ibot.config.global_batch)."""
    recipe = cfg.get("global_batch_size")
    if recipe is None or recipe == global_batch:
        return False
    if not cfg.get("batch_rescale"):
        raise ValueError(f"pretrain.global_batch_size is {recipe} but this job runs {global_batch} images per step "
                         f"(batch_size_per_gpu {cfg['batch_size_per_gpu']} x {dist_utils.world_size()} processes); "
                         "fix the resources or set pretrain.batch_rescale: true")
    print(f"[pretrain] global batch {global_batch} instead of the recipe's {recipe} (batch_rescale): peak lr "
          f"{cfg['lr']} x {global_batch}/256", flush=True)
    return True


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX, via oneDNN). Without it, bf16
    matmuls are emulated: measured 75x slower than fp32 on an AVX2-only CPU (1024^2 matmul)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def select_attention_kernel(models: tuple[nn.Module, ...], device: torch.device, autocast_dtype: torch.dtype | None
                            ) -> None:
    """Fused SDPA everywhere except CPU under autocast, where PyTorch's fused kernel is 3-7x slower
    than the explicit softmax(qk^T)v (same math; measured by bench/pretrain_step.py)."""
    fused = not (device.type == "cpu" and autocast_dtype is not None)
    for model in models:
        model.backbone.set_fused_attention(fused)


def build_models(cfg: Mapping[str, Any], spec: ModelSpec | Mapping[str, Any]) -> tuple[IBOTModel, IBOTModel]:
    """Student (drop path, mask token) and teacher (same weights, no drop path, no grad)."""
    spec = ModelSpec.of(spec)
    kwargs = dict(patch_size=spec.patch_size, img_size=cfg["global_crops_size"], depth=spec.depth,
                  window_size=spec.window_size)
    student_backbone = build_backbone(spec.arch, drop_path_rate=cfg["drop_path"],
                                      masked_im_modeling=cfg["use_masked_im_modeling"], **kwargs)
    teacher_backbone = build_backbone(spec.arch, masked_im_modeling=False, **kwargs)
    student = IBOTModel(student_backbone, build_head(student_backbone.embed_dim, cfg, teacher=False))
    teacher = IBOTModel(teacher_backbone, build_head(teacher_backbone.embed_dim, cfg, teacher=True))
    state = student.state_dict()
    if cfg.get("head_sharing", "flags") != "flags":
        # Only the EMA pairs (names the teacher has as parameters or buffers): a teacher head that shares
        # its output layer then starts as the student's [CLS] branch, the branch its EMA follows. The
        # official copy (main_ibot.py:263, kept for ``flags``) also writes the student's separate
        # ``last_layer2`` into the teacher's alias, after ``last_layer``: it starts as the patch layer.
        names = {n for n, _ in teacher.named_parameters()} | {n for n, _ in teacher.named_buffers()}
        state = {k: v for k, v in state.items() if k in names}
    teacher.load_state_dict(state, strict=False)  # official: shared names only
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


def _shared_parameters(student: nn.Module, teacher: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters present in both networks, by name (official EMA rule: e.g. last_layer2 excluded)."""
    teacher_params = dict(teacher.named_parameters())
    pairs = [(p, teacher_params[n]) for n, p in student.named_parameters() if n in teacher_params]
    return [p for p, _ in pairs], [t for _, t in pairs]


class Trainer:
    """Holds the state of one pretraining run; ``fit`` trains from the last checkpoint to the end."""

    def __init__(self, cfg: Mapping[str, Any], spec: Mapping[str, Any], data: str | Path, work_dir: str | Path) -> None:
        self.cfg, self.spec = dict(cfg), dict(spec)
        self.work_dir = Path(work_dir)
        self.device = torch.device("cuda", dist_utils.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
        self.autocast_dtype, use_scaler = _precision(self.cfg, self.device)
        torch.manual_seed(self.cfg["seed"])
        check_mim_heads(self.cfg)  # offline MIM target: head sizes the official teacher copy accepts
        self.student, self.teacher = (m.to(self.device) for m in build_models(self.cfg, self.spec))
        select_attention_kernel((self.student, self.teacher), self.device, self.autocast_dtype)
        # Offline MIM target (paper Tab. 9/20; None = the official online teacher), checked against the
        # student's patch head here, before any data or training: a vocabulary mismatch fails at once.
        self.tokenizer = build_mim_tokenizer(self.cfg, patch_size=self.student.backbone.mask_patch_size,
                                             student_patch_dim=self.student.head.patch_out_dim)
        if self.tokenizer is not None:
            self.tokenizer.to(self.device)
        if self.cfg["compile"]:  # the backbones only: static shapes ([B, N, D] tokens); heads see masked subsets
            for model in (self.student, self.teacher):
                model.backbone.compile()
        self.student_ddp: nn.Module = self.student
        if dist_utils.world_size() > 1:
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ema_pairs = _shared_parameters(self.student, self.teacher)

        g, l = self.cfg["global_crops_number"], self.cfg["local_crops_number"]
        self.dataset = MultiCropMaskedDataset(
            data, global_crops_scale=tuple(self.cfg["global_crops_scale"]),
            local_crops_scale=tuple(self.cfg["local_crops_scale"]), global_crops_number=g, local_crops_number=l,
            global_crops_size=self.cfg["global_crops_size"], local_crops_size=self.cfg["local_crops_size"],
            # masks on the grid the patch loss sees: ViT patches, Swin final-stage tokens (main_ibot.py:167)
            patch_size=self.student.backbone.mask_patch_size, pred_ratio=self.cfg["pred_ratio"],
            pred_ratio_var=self.cfg["pred_ratio_var"], pred_shape=self.cfg["pred_shape"],
            pred_start_epoch=self.cfg["pred_start_epoch"], seed=self.cfg["seed"],
            augmentation=self.cfg["augmentation"])
        self.global_batch = self.cfg["batch_size_per_gpu"] * dist_utils.world_size()
        self.batch_rescaled = check_global_batch(self.cfg, self.global_batch)
        self.sampler = GlobalBatchSampler(len(self.dataset), self.global_batch, dist_utils.rank(),
                                          dist_utils.world_size(), self.cfg["seed"])
        iters, epochs = self.sampler.steps, self.cfg["epochs"]
        for key in ("warmup_epochs", "warmup_teacher_temp_epochs", "pred_start_epoch"):
            if self.cfg[key] > epochs:
                raise ValueError(f"pretrain.{key} = {self.cfg[key]} exceeds pretrain.epochs = {epochs}")
        self.iters_per_epoch = iters

        self.loss = IBOTLoss(self.cfg["out_dim"], loss_patch_out_dim(self.cfg), g, l,
                             self.cfg["warmup_teacher_temp"], self.cfg["teacher_temp"],
                             self.cfg["warmup_teacher_patch_temp"], self.cfg["teacher_patch_temp"],
                             self.cfg["warmup_teacher_temp_epochs"], epochs, lambda1=self.cfg["lambda1"],
                             lambda2=self.cfg["lambda2"], mim_start_epoch=self.cfg["pred_start_epoch"],
                             # patch-target ablations (App. E, Tab. 18); defaults = official (main_ibot.py:482)
                             center_momentum2=self.cfg.get("patch_center_momentum", 0.9),
                             patch_centering=self.cfg.get("patch_centering", True),
                             patch_targets=self.cfg.get("patch_targets", "soft")).to(self.device)
        if self.cfg["optimizer"] != "adamw":
            raise ValueError(f"pretrain.optimizer: {self.cfg['optimizer']!r} is not supported; use 'adamw' (ViT recipe)")
        # fused AdamW on CUDA: one kernel for all parameters (same update; the default is foreach)
        self.optimizer = torch.optim.AdamW(param_groups(self.student), fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        peak_lr = scaled_lr("pretrain", self.cfg["lr"], self.global_batch)  # lr x batch / 256 (main_ibot.py:306)
        self.lr_schedule = cosine_schedule(peak_lr, self.cfg["min_lr"], epochs,
                                           iters, warmup_epochs=self.cfg["warmup_epochs"])
        self.wd_schedule = cosine_schedule(self.cfg["weight_decay"], self.cfg["weight_decay_end"], epochs, iters)
        self.momentum_schedule = cosine_schedule(self.cfg["momentum_teacher"], 1.0, epochs, iters)
        self.start_epoch = 0
        # cumulative training seconds over every session (checkpoint ``elapsed_s``) and at each TIME_MARKS epoch
        self.elapsed_s, self.mark_elapsed_s, self.elapsed_partial = 0.0, {}, False
        self.time_marks = TIME_MARKS  # tests set tiny marks
        # peak memory over every session that trained (checkpoint ``peak_memory``): a resumed run that trains
        # nothing reports the training's peak, not that of a process which only loaded the checkpoint
        self.peak_memory: dict[str, Any] | None = None

    # -- checkpointing ------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "checkpoint.pth"

    def state_dict(self, epoch: int) -> dict[str, Any]:
        """Official keys (student, teacher, optimizer, epoch, args, ibot_loss, fp16_scaler) + RNG states."""
        state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                 "args": {**self.cfg, **{k: v for k, v in self.spec.items() if v is not None}},
                 "ibot_loss": self.loss.state_dict(), "rng": {"torch": torch.get_rng_state()},
                 "elapsed_s": self.elapsed_s, "mark_elapsed_s": dict(self.mark_elapsed_s),
                 "elapsed_partial": self.elapsed_partial, "peak_memory": self.peak_memory}
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, epoch: int) -> None:
        if not dist_utils.is_main():
            return
        state = self.state_dict(epoch)
        save_atomic(state, self.checkpoint_path)
        if self.cfg["saveckp_freq"] and epoch % self.cfg["saveckp_freq"] == 0 and epoch < self.cfg["epochs"]:
            save_atomic(state, self.work_dir / f"checkpoint{epoch:04d}.pth")

    def resume(self) -> None:
        """Restore the latest checkpoint (ours or an official one via ``load_from``) if any."""
        path = self.checkpoint_path if self.checkpoint_path.is_file() else (
            Path(self.cfg["load_from"]) if self.cfg["load_from"] else None)
        if path is None:
            return
        state = load_file(path, map_location=self.device)
        strip = lambda sd: {k.removeprefix("module."): v for k, v in sd.items()}  # noqa: E731
        for name, module in (("student", self.student), ("teacher", self.teacher)):
            if not isinstance(state.get(name), Mapping):
                raise CheckpointError(f"checkpoint {path}: no {name!r} state dict; keys: {sorted(state)[:20]}")
            check_state_dict(module, strip(state[name]), f"checkpoint {path} ({name})")
        self.student.load_state_dict(strip(state["student"]))
        self.teacher.load_state_dict(strip(state["teacher"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["ibot_loss"])
        if self.scaler is not None and "fp16_scaler" in state:
            self.scaler.load_state_dict(state["fp16_scaler"])
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"].cpu())
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.start_epoch = int(state["epoch"])
        # older checkpoints (and official ones) carry no time: count from 0 and say the figure is partial
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.mark_elapsed_s = {int(k): float(v) for k, v in (state.get("mark_elapsed_s") or {}).items()}
        self.elapsed_partial = bool(state.get("elapsed_partial", False)) or (
            self.start_epoch > 0 and "elapsed_s" not in state)
        self.peak_memory = state.get("peak_memory")
        print(f"[pretrain] resumed from {path} at epoch {self.start_epoch}", flush=True)

    # -- training -----------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, images: list[Tensor] | PendingViews, masks: list[Tensor], epoch: int, it: int
                   ) -> dict[str, float]:
        """One official iBOT iteration (schedules, forward, loss, backward, clip, step, EMA), its logged
        values as Python floats (a host sync; ``fit`` syncs only at log steps, see :meth:`_step`).

        ``images``: the float views, or (``augmentation: fast | gpu``) uint8 views, finished here on the
        device (``fast``: normalised; ``gpu``: photometric ops and normalisation)."""
        return self._materialize([self._step(images, masks, epoch, it)])[0]

    def _step(self, images: list[Tensor] | PendingViews, masks: list[Tensor], epoch: int, it: int
              ) -> dict[str, Any]:
        """The iteration without a host sync: the loss terms stay on the device (``terms``)."""
        cfg, g = self.cfg, self.cfg["global_crops_number"]
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it])  # python floats: numpy scalars fail weights_only loads
            if index == 0:
                group["weight_decay"] = float(self.wd_schedule[it])
        if isinstance(images, PendingViews):
            images = images.finish(self.device)
        else:
            images = [im.to(self.device, non_blocking=True) for im in images]
        global_masks = torch.cat([m.to(self.device, non_blocking=True) for m in masks[:g]])
        globals_ = torch.cat(images[:g])
        locals_ = torch.cat(images[g:]) if len(images) > g else None

        patch_targets = None
        if self.tokenizer is not None:  # offline target: ids of the masked tokens, from the unmasked crops
            patch_targets = self.tokenizer.tokenize(globals_).flatten(1)[global_masks.flatten(1)]
        with self._autocast():
            with torch.no_grad():
                teacher_out = self.teacher(globals_, None, global_masks, teacher=True)
            student_out = self.student_ddp(globals_, locals_, global_masks)
            losses = self.loss((student_out["cls"], student_out["patch"]), (teacher_out["cls"], teacher_out["patch"]),
                               student_out.get("local_cls"), global_masks, epoch,
                               teacher_patch_mean=teacher_out["patch_mean"], patch_targets=patch_targets)
        loss = losses["loss"]  # its finiteness is checked in _materialize, before any checkpoint is written

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if cfg["clip_grad"]:
                clip_gradients_per_param(self.student, cfg["clip_grad"])
            cancel_last_layer_gradients(self.student, epoch, cfg["freeze_last_layer"])
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if cfg["clip_grad"]:
                self.scaler.unscale_(self.optimizer)
                clip_gradients_per_param(self.student, cfg["clip_grad"])
            cancel_last_layer_gradients(self.student, epoch, cfg["freeze_last_layer"])
            self.scaler.step(self.optimizer)
            self.scaler.update()

        with torch.no_grad():
            momentum = self.momentum_schedule[it]
            student_params, teacher_params = self.ema_pairs
            torch._foreach_mul_(teacher_params, momentum)
            torch._foreach_add_(teacher_params, [p.detach() for p in student_params], alpha=1 - momentum)
        # Logged values are means over all processes (the local loss covers only this rank's slice).
        logged = dist_utils.all_reduce_sum(torch.stack([losses["loss"], losses["cls"], losses["patch"]]).detach().float())
        return {"epoch": epoch, "iteration": it, "terms": logged / dist_utils.world_size(),
                "lr": float(self.lr_schedule[it]), "wd": float(self.wd_schedule[it]), "momentum": float(momentum),
                "teacher_temp": float(self.loss.teacher_temp_schedule[epoch]),
                "teacher_patch_temp": float(self.loss.teacher_temp2_schedule[epoch])}

    def _materialize(self, pending: list[dict[str, Any]]) -> list[dict[str, float]]:
        """One host sync for the steps since the last log step: their loss terms as floats, and the
        official stop on a non-finite loss (main_ibot.py checks every step; here the check runs at log
        steps, before the epoch's checkpoint, so no checkpoint ever holds the non-finite update)."""
        terms = torch.stack([step["terms"] for step in pending]).tolist()
        rows = []
        for step, (total, cls_term, patch_term) in zip(pending, terms):
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"pretraining loss is {total} at epoch {step['epoch']}, iteration {step['iteration']}; stopping. "
                    f"The last good checkpoint is {self.checkpoint_path} (epoch {step['epoch']}); lower lr, raise "
                    "clip_grad or use fp32.")
            schedules = {k: v for k, v in step.items() if k not in ("epoch", "iteration", "terms")}
            rows.append({"loss": total, "cls": cls_term, "patch": patch_term, **schedules})
        return rows

    def _loader(self, epoch: int) -> DataLoader:
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        workers = self.cfg["num_workers"]
        return DataLoader(self.dataset, batch_size=self.cfg["batch_size_per_gpu"], sampler=self.sampler,
                          num_workers=workers, collate_fn=collate_multicrop, drop_last=True,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if workers else None)

    def fit(self, tb_dir: str | Path | None = None) -> dict[str, Any]:
        """Train from the last checkpoint to the end. ``tb_dir``: TensorBoard scalars of every logged
        iteration (``pretrain/<train_log key>`` at the global iteration; see :mod:`ibot.tensorboard`)."""
        from ibot.tensorboard import ScalarWriter

        self.work_dir.mkdir(parents=True, exist_ok=True)
        if dist_utils.is_main():  # temp files of saves killed midway (SIGKILL skips save_atomic's cleanup)
            for stale in self.work_dir.glob(".checkpoint*.pth.*.tmp"):
                stale.unlink(missing_ok=True)
        self.resume()
        log = TrainLog(self.work_dir / "train_log.jsonl", keep_before_epoch=self.start_epoch)
        tb = ScalarWriter(tb_dir, resume_step=self.start_epoch * self.iters_per_epoch)  # flushes every add
        epochs, started = self.cfg["epochs"], time.time()
        previous_s = self.elapsed_s  # sessions before this one (resume)
        total_iters = (epochs - self.start_epoch) * self.iters_per_epoch
        done_iters = 0
        for epoch in range(self.start_epoch, epochs):
            self.student.train()
            epoch_start = interval_start = time.time()
            pending: list[dict[str, Any]] = []  # steps since the last log step, values still on the device
            for step, (images, _, masks) in enumerate(self._loader(epoch)):
                it = epoch * self.iters_per_epoch + step
                pending.append(self._step(images, masks, epoch, it))
                done_iters += 1
                if step % self.cfg["log_every"] == 0 or step == self.iters_per_epoch - 1:
                    rows = self._materialize(pending)  # the only host sync of the loop
                    rate = len(rows) * self.global_batch / max(time.time() - interval_start, 1e-9)
                    for row, done in zip(rows, pending):  # throughput of the interval, data loading included
                        log.write({"epoch": epoch, "iteration": done["iteration"], **row, "images_per_s": rate,
                                   "elapsed_h": (previous_s + time.time() - started) / 3600})
                    stats = {**rows[-1], "images_per_s": rate}
                    pending, interval_start = [], time.time()
                    tb.add({f"pretrain/{key}": value for key, value in stats.items()}, it)
                    elapsed = time.time() - started
                    eta = elapsed / done_iters * (total_iters - done_iters)
                    print(f"[pretrain] epoch {epoch + 1}/{epochs} it {step + 1}/{self.iters_per_epoch} "
                          f"loss {stats['loss']:.4f} (cls {stats['cls']:.4f} patch {stats['patch']:.4f}) "
                          f"lr {stats['lr']:.2e} {stats['images_per_s']:.1f} img/s eta {eta / 60:.1f} min",
                          flush=True)
            # cumulative time at the end of the epoch, before its checkpoint (which stores it)
            self.elapsed_s = previous_s + time.time() - started
            if epoch + 1 in self.time_marks:
                self.mark_elapsed_s[epoch + 1] = self.elapsed_s
            self.peak_memory = max_peak_memory(self.peak_memory, peak_memory(self.device))
            self.save(epoch + 1)
            print(f"[pretrain] epoch {epoch + 1} done in {time.time() - epoch_start:.1f}s; checkpoint saved", flush=True)
        tb.close()
        dist_utils.barrier()
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        device = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                  else _cpu_model())
        cfg = self.cfg
        return {**(self.peak_memory or peak_memory(self.device)), "memory_unit": "GiB (2^30 bytes)",
                "device_name": device, "device_type": self.device.type, "world_size": dist_utils.world_size(),
                "device_count": torch.cuda.device_count() if self.device.type == "cuda" else 1,
                "crops": {"global": f"{cfg['global_crops_number']}x{cfg['global_crops_size']}",
                          "local": f"{cfg['local_crops_number']}x{cfg['local_crops_size']}"},
                # cumulative over resumes; partial: resumed from a checkpoint that did not record its time
                "train_hours": self.elapsed_s / 3600, "train_hours_partial": self.elapsed_partial,
                "train_hours_at": {mark: self.mark_elapsed_s[mark] / 3600 for mark in epoch_marks(epochs, self.time_marks)
                                   if mark in self.mark_elapsed_s},
                # train_time_s: this session only (since the resume); elapsed_s: all sessions
                "elapsed_s": self.elapsed_s,
                "epochs": epochs, "iterations_per_epoch": self.iters_per_epoch, "global_batch": self.global_batch,
                "recipe_global_batch": self.cfg["global_batch_size"], "batch_rescaled": self.batch_rescaled,
                "peak_lr": scaled_lr("pretrain", self.cfg["lr"], self.global_batch), "precision": precision,
                "train_time_s": time.time() - started, "resumed_from_epoch": self.start_epoch}


class TrainLog:
    """Append-only JSON-lines log (main rank); on resume, rows of re-run epochs are dropped first."""

    def __init__(self, path: Path, keep_before_epoch: int) -> None:
        self.path = path
        self.enabled = dist_utils.is_main()
        if self.enabled and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and _row_epoch(line) is not None and _row_epoch(line) < keep_before_epoch]
            write_text_atomic(path, "".join(r + "\n" for r in rows))

    def write(self, row: Mapping[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


def _cpu_model() -> str:
    from ibot.metrics import device_info

    return str(device_info().get("name") or "cpu")


def _row_epoch(line: str) -> int | None:
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a kill


def train(cfg: Mapping[str, Any], spec: Mapping[str, Any], data: str | Path, work_dir: str | Path,
          tb_dir: str | Path | None = None) -> Trainer:
    """Train to the end (resuming if possible) and return the trainer (for tests and export);
    ``tb_dir``: where the live TensorBoard curves go (none without it)."""
    trainer = Trainer(cfg, spec, data, work_dir)
    trainer.summary = trainer.fit(tb_dir=tb_dir)
    return trainer


def run(ctx: StageContext) -> dict[str, Any]:
    """The pretraining stage (registry ``pretrain``): train in ``work/`` (resuming), then export the teacher
    and the student backbone, both projection heads (``heads.pth``: official ``head.*`` key names, loaded by
    ``ibot.checkpoint.build_pretrained_head`` for unsupervised classification and semi-supervised
    fine-tuning from a head layer), the training curves and ``metrics.json`` (the last logged losses, the
    run's summary in ``extra``)."""
    cfg = {**ctx.config, "seed": ctx.seed}
    out, spec = ctx.dir, ctx.model
    trainer = train(cfg, spec.as_dict(), ctx.data_root, ctx.work.path, tb_dir=ctx.tb_dir)
    summary = {**trainer.summary, "arch": spec.arch, "patch_size": spec.patch_size,
               "depth": trainer.teacher.backbone.depth}
    if not dist_utils.is_main():
        return summary
    meta = {"arch": spec.arch, "patch_size": spec.patch_size, "depth": trainer.teacher.backbone.depth,
            "epochs": cfg["epochs"], "fingerprint": ctx.work.digest}
    # both backbones, as the official release (checkpoint_teacher.pth / checkpoint_student.pth): models pick one
    for network, model in (("teacher", trainer.teacher), ("student", trainer.student)):
        export_backbone(model.backbone, out / f"{network}_backbone.pth",
                        {**meta, "network": network, "source": f"ibot-repro {network}"})
    export_heads({"teacher": trainer.teacher.head, "student": trainer.student.head}, out / "heads.pth",
                 {**meta, **{k: cfg[k] for k in HEAD_SETTINGS if k in cfg},
                  "embed_dim": trainer.teacher.backbone.embed_dim})
    rows = export_log_csv(ctx.work.path / "train_log.jsonl", out / "train_log.csv")
    last = rows[-1] if rows else {}
    classes = len(getattr(trainer.dataset.dataset, "classes", []))
    ctx.write_metrics(task="pretrain", dataset=_dataset_label(ctx, classes),
                      protocol=f"ibot,{cfg['epochs']}ep,batch={trainer.global_batch}",
                      metrics={**{key: float(last[key]) for key in ("loss", "cls", "patch") if key in last},
                               **time_memory_metrics(summary)},
                      extra={"summary": summary, "last_logged_iteration": last.get("iteration")})
    return summary


def max_peak_memory(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """The larger of two :func:`peak_memory` records, field by field (a session resumed on another kind of
    device starts over from its own)."""
    if not previous or previous.get("memory_kind") != current["memory_kind"]:
        return dict(current)
    return {key: max(float(previous.get(key, value)), float(value)) if isinstance(value, (int, float)) else value
            for key, value in current.items()}


def time_memory_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The paper's Tab.19 quantities of a run (arXiv:2111.07832v3): ``train_hours`` (cumulative over resumes,
    to the last epoch), ``train_hours_<m>ep`` for each mark m of TIME_MARKS the run reached (one 800-epoch run
    gives T100/T300/T800) and ``peak_memory_gb`` (GiB per process, max over processes; its kind, CUDA allocated
    or CPU resident, in ``extra.summary.memory_kind``)."""
    metrics = {"train_hours": float(summary["train_hours"])}
    metrics.update({f"train_hours_{int(mark)}ep": float(hours) for mark, hours in summary["train_hours_at"].items()})
    metrics["peak_memory_gb"] = float(summary["peak_memory_gb"])
    return metrics


def _dataset_label(ctx: StageContext, num_classes: int) -> str:
    """``imagenet-1k`` / ``imagenet-22k`` for the real sets (by class count), else the data folder's name."""
    kind, root = next(iter(ctx.data.items()))
    official = {("imagenet", 1000): "imagenet-1k", ("imagenet22k", 21841): "imagenet-22k"}.get((kind, num_classes))
    return official or (root.parent if root.name == "train" else root).resolve().name


def export_log_csv(jsonl: Path, csv_path: Path) -> list[dict[str, Any]]:
    """``train_log.jsonl`` as CSV (the results' curves); returns its rows."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    columns = list(dict.fromkeys(key for row in rows for key in row))  # union: a log resumed from an older one
    write_csv_atomic(csv_path, rows, columns or ["epoch"])
    return rows
