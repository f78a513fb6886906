"""The official iBOT training iteration, transcribed: the oracle our ``Trainer.train_step`` is tested against.

:class:`OfficialStep` is one iteration of ``train_one_epoch`` of bytedance/ibot (``main_ibot.py:393-455``)
on a single process, computed the way the official code computes it: ``MultiCropWrapper`` semantics
(the head projects *every* token of every crop, ``utils.py:648-692``), the official ``iBOTLoss`` on
the full ``[G*B, N, P]`` patch logits with its explicit loops (``main_ibot.py:478-572``), explicit
softmax(q kᵀ) v attention (timm ``fused_attn = False``), the per-parameter clipping loop
(``utils.py:154-163``), the last-layer freeze (``utils.py:166-171``), the two AdamW groups
(``utils.py:698-709``), the cosine schedules (``utils.py:209-220``) and the EMA loop over common
parameter names (``main_ibot.py:380-390, 451-455``). Shared with ours: the network modules
themselves (backbone and head weights; the reference is a deep copy), inputs, masks, drop-path draws.

:class:`OursStep` is our ``Trainer.train_step`` unchanged, on a Trainer built without data or
checkpoints; :func:`build_harnesses` makes both from the same initial weights plus one synthetic
batch. Used by ``tests/test_pretrain.py`` (equivalence over several steps) and by
``bench/pretrain_step.py`` (throughput of both). Nothing here imports from ``bench/``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibot.data.masking import MaskGenerator
from ibot.loss import IBOTLoss
from ibot.models.head import loss_patch_out_dim
from ibot.stages import stage_defaults
from ibot.train.pretrain import IBOTModel, Trainer, _precision, _shared_parameters, build_models, select_attention_kernel
from ibot.train.schedules import cosine_schedule, param_groups

__all__ = ["EPOCH", "ITERS_PER_EPOCH", "GLOBAL_CROPS", "GLOBAL_SIZE", "LOCAL_SIZE", "PATCH", "step_config",
           "Batch", "synthetic_batch", "autocast", "OursStep", "OfficialIBOTLoss", "official_loss", "OfficialStep",
           "official_cosine_scheduler", "official_params_groups", "official_clip_gradients",
           "official_cancel_gradients_last_layer", "disable_fused_attention", "multicrop_forward", "build_harnesses"]

#: Steps run at this epoch: past ``freeze_last_layer`` (1), so the output layers train as in most of a run.
EPOCH = 1
ITERS_PER_EPOCH = 1000
GLOBAL_CROPS, GLOBAL_SIZE, LOCAL_SIZE, PATCH = 2, 224, 96, 16


# -- configuration and inputs (both sides) ------------------------------------------------------------
def step_config(out_dim: int, local_crops: int, batch: int, precision: str) -> dict[str, Any]:
    """Official ViT-S/16 recipe flags (README command: shared head, no last-layer norm, block masks)."""
    return {**stage_defaults("pretrain"), "out_dim": out_dim, "patch_out_dim": out_dim, "shared_head": True,
            "norm_last_layer": False, "teacher_temp": 0.07, "local_crops_number": local_crops,
            "global_crops_number": GLOBAL_CROPS, "pred_ratio": [0.0, 0.3], "pred_ratio_var": [0.0, 0.2],
            "batch_size_per_gpu": batch, "precision": precision}


@dataclass
class Batch:
    """Crops as the loader delivers them: G global then L local [B,3,H,W]; one [B,h,w] mask per global crop."""

    images: list[Tensor]
    masks: list[Tensor]


def synthetic_batch(cfg: dict[str, Any], device: torch.device, seed: int = 0) -> Batch:
    """Random crops and official block masks (pred_ratio / pred_ratio_var from ``cfg``)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    batch, grid = cfg["batch_size_per_gpu"], GLOBAL_SIZE // PATCH
    masker = MaskGenerator(PATCH, cfg["pred_ratio"], cfg["pred_ratio_var"], pred_shape="block")
    sizes = [GLOBAL_SIZE] * cfg["global_crops_number"] + [LOCAL_SIZE] * cfg["local_crops_number"]
    images = [torch.randn(batch, 3, s, s, generator=gen).to(device) for s in sizes]
    masks = [torch.from_numpy(np.stack([masker(grid, grid, rng) for _ in range(batch)])).to(device)
             for _ in range(cfg["global_crops_number"])]
    return Batch(images, masks)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """bf16/fp16 autocast, or a disabled autocast for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)


# -- ours: Trainer.train_step, unchanged ------------------------------------------------------------
class OursStep(Trainer):
    """A Trainer without dataset, sampler or checkpoints; ``train_step`` is the real one."""

    def __init__(self, student: IBOTModel, teacher: IBOTModel, cfg: dict[str, Any],
                 device: torch.device) -> None:  # pylint: disable=super-init-not-called
        self.cfg, self.spec, self.device = cfg, {}, device
        self.work_dir = Path("harness-no-checkpoints")
        self.autocast_dtype, use_scaler = _precision(cfg, device)
        self.student, self.teacher, self.student_ddp = student, teacher, student
        self.tokenizer = None  # the online tokenizer (the official target)
        select_attention_kernel((student, teacher), device, self.autocast_dtype)  # the trainer's choice
        self.ema_pairs = _shared_parameters(student, teacher)
        self.loss = IBOTLoss(cfg["out_dim"], loss_patch_out_dim(cfg), cfg["global_crops_number"],
                             cfg["local_crops_number"], cfg["warmup_teacher_temp"], cfg["teacher_temp"],
                             cfg["warmup_teacher_patch_temp"], cfg["teacher_patch_temp"],
                             cfg["warmup_teacher_temp_epochs"], cfg["epochs"], lambda1=cfg["lambda1"],
                             lambda2=cfg["lambda2"], mim_start_epoch=cfg["pred_start_epoch"]).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(student))
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        epochs = cfg["epochs"]
        self.lr_schedule = cosine_schedule(cfg["lr"] * cfg["batch_size_per_gpu"] / 256.0, cfg["min_lr"], epochs,
                                           ITERS_PER_EPOCH, warmup_epochs=cfg["warmup_epochs"])
        self.wd_schedule = cosine_schedule(cfg["weight_decay"], cfg["weight_decay_end"], epochs, ITERS_PER_EPOCH)
        self.momentum_schedule = cosine_schedule(cfg["momentum_teacher"], 1.0, epochs, ITERS_PER_EPOCH)
        self.iters_per_epoch = ITERS_PER_EPOCH

    def step(self, batch: Batch, it: int) -> float:
        """One training step; returns the loss."""
        return self.train_step(batch.images, batch.masks, EPOCH, it)["loss"]


# -- the official pieces, transcribed ------------------------------------------------------------------
def official_cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                              warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """``utils.cosine_scheduler`` (utils.py:209-220)."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def official_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``utils.get_params_groups`` (utils.py:698-709): no weight decay on biases and norm parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def official_clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """``utils.clip_gradients`` (utils.py:154-163): per-parameter norm, one host sync per parameter."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def official_cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """``utils.cancel_gradients_last_layer`` (utils.py:166-171)."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


class OfficialIBOTLoss(nn.Module):
    """``iBOTLoss`` (main_ibot.py:478-572) on one process (its ``dist.all_reduce`` is the identity)."""

    def __init__(self, out_dim: int, patch_out_dim: int, ngcrops: int, nlcrops: int, warmup_teacher_temp: float,
                 teacher_temp: float, warmup_teacher_temp2: float, teacher_temp2: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, center_momentum2: float = 0.9, lambda1: float = 1.0,
                 lambda2: float = 1.0, mim_start_epoch: int = 0) -> None:
        super().__init__()  # main_ibot.py:479-512
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.ngcrops = ngcrops
        self.nlcrops = nlcrops
        self.ncrops = ngcrops + nlcrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
        ))
        self.teacher_temp2_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp2
        )) if mim_start_epoch == 0 else np.concatenate((
            np.ones(mim_start_epoch) * warmup_teacher_temp2,
            np.linspace(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs - mim_start_epoch) * teacher_temp2
        ))

    def forward(self, student_output: tuple[Tensor, Tensor], teacher_output: tuple[Tensor, Tensor],
                student_local_cls: Tensor | None, student_mask: Sequence[Tensor], epoch: int) -> dict[str, Tensor]:
        """main_ibot.py:514-557."""
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        student_cls = student_cls / self.student_temp
        student_cls_c = student_cls.chunk(self.ncrops)
        student_patch = student_patch / self.student_temp
        student_patch_c = student_patch.chunk(self.ngcrops)
        temp = self.teacher_temp_schedule[epoch]
        temp2 = self.teacher_temp2_schedule[epoch]
        teacher_cls_c = F.softmax((teacher_cls - self.center) / temp, dim=-1)
        teacher_cls_c = teacher_cls_c.detach().chunk(self.ngcrops)
        teacher_patch_c = F.softmax((teacher_patch - self.center2) / temp2, dim=-1)
        teacher_patch_c = teacher_patch_c.detach().chunk(self.ngcrops)

        total_loss1, n_loss_terms1 = 0, 0
        total_loss2, n_loss_terms2 = 0, 0
        for q in range(len(teacher_cls_c)):
            for v in range(len(student_cls_c)):
                if v == q:
                    loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                    mask = student_mask[v].flatten(-2, -1)
                    loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                    total_loss2 += loss2.mean()
                    n_loss_terms2 += 1
                else:
                    loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], dim=-1), dim=-1)
                    total_loss1 += loss1.mean()
                    n_loss_terms1 += 1
        total_loss1 = total_loss1 / n_loss_terms1 * self.lambda1
        total_loss2 = total_loss2 / n_loss_terms2 * self.lambda2
        total_loss = dict(cls=total_loss1, patch=total_loss2, loss=total_loss1 + total_loss2)
        self.update_center(teacher_cls, teacher_patch)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """main_ibot.py:559-572 with world size 1."""
        cls_center = torch.sum(teacher_cls, dim=0, keepdim=True)
        cls_center = cls_center / len(teacher_cls)
        self.center = self.center * self.center_momentum + cls_center * (1 - self.center_momentum)
        patch_center = torch.sum(teacher_patch.mean(1), dim=0, keepdim=True)
        patch_center = patch_center / len(teacher_patch)
        self.center2 = self.center2 * self.center_momentum2 + patch_center * (1 - self.center_momentum2)


def official_loss(cfg: dict[str, Any]) -> OfficialIBOTLoss:
    """The loss as main_ibot.py:270-285 builds it."""
    same_dim = cfg["shared_head"] or cfg["shared_head_teacher"]
    return OfficialIBOTLoss(cfg["out_dim"], cfg["out_dim"] if same_dim else cfg["patch_out_dim"],
                            cfg["global_crops_number"], cfg["local_crops_number"], cfg["warmup_teacher_temp"],
                            cfg["teacher_temp"], cfg["warmup_teacher_patch_temp"], cfg["teacher_patch_temp"],
                            cfg["warmup_teacher_temp_epochs"], cfg["epochs"], lambda1=cfg["lambda1"],
                            lambda2=cfg["lambda2"], mim_start_epoch=cfg["pred_start_epoch"])


def disable_fused_attention(model: nn.Module) -> int:
    """Make every timm attention compute softmax(q k^T) v explicitly (official ViT); returns the count."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
            count += 1
    return count


def multicrop_forward(model: IBOTModel, crops: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``MultiCropWrapper.forward`` (utils.py:667-692) on one resolution group: backbone, then the head
    on ALL tokens ([CLS] logits [n, K] and patch logits [n, N, P])."""
    return model.head(model.backbone(crops, mask=mask))


class OfficialStep:
    """One ``train_one_epoch`` iteration of bytedance/ibot (single process, no DDP wrapper, no fp16 scaler)."""

    def __init__(self, student: IBOTModel, teacher: IBOTModel, cfg: dict[str, Any], device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.autocast_dtype, _ = _precision(cfg, device)
        self.student, self.teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        self.unfused = disable_fused_attention(self.student) + disable_fused_attention(self.teacher)
        self.loss = official_loss(cfg).to(device)
        self.optimizer = torch.optim.AdamW(official_params_groups(self.student))  # main_ibot.py:292-294
        epochs = cfg["epochs"]  # main_ibot.py:305-318
        self.lr_schedule = official_cosine_scheduler(cfg["lr"] * cfg["batch_size_per_gpu"] / 256.0, cfg["min_lr"],
                                                     epochs, ITERS_PER_EPOCH, warmup_epochs=cfg["warmup_epochs"])
        self.wd_schedule = official_cosine_scheduler(cfg["weight_decay"], cfg["weight_decay_end"], epochs,
                                                     ITERS_PER_EPOCH)
        self.momentum_schedule = official_cosine_scheduler(cfg["momentum_teacher"], 1, epochs, ITERS_PER_EPOCH)

    def forward_loss(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Teacher, student (globals, then locals through backbone + head) and the official loss
        (main_ibot.py:405-416)."""
        g = self.cfg["global_crops_number"]
        globals_, masks = torch.cat(batch.images[:g]), torch.cat(batch.masks[:g])
        with autocast(self.device, self.autocast_dtype):
            teacher_output = multicrop_forward(self.teacher, globals_)
            student_output = multicrop_forward(self.student, globals_, mask=masks)
            student_local_cls = (multicrop_forward(self.student, torch.cat(batch.images[g:]))[0]
                                 if len(batch.images) > g else None)
            losses = self.loss(student_output, teacher_output, student_local_cls, batch.masks, EPOCH)
        outputs = {"student": student_output, "teacher": teacher_output, "local_cls": student_local_cls}
        return losses, outputs

    def step(self, batch: Batch, it: int, before_update: Any = None) -> dict[str, float]:
        """One training step; returns the loss. ``before_update(outputs)`` (optional) sees the step's
        official-layout outputs before the backward pass; its result is returned as ``"check"``."""
        cfg = self.cfg
        for i, param_group in enumerate(self.optimizer.param_groups):  # main_ibot.py:396-399
            param_group["lr"] = self.lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = self.wd_schedule[it]
        losses, outputs = self.forward_loss(batch)
        loss = losses["loss"]
        result: dict[str, float] = {"loss": loss.item()}
        if before_update is not None:
            result["check"] = before_update(outputs)
        if not math.isfinite(result["loss"]):  # main_ibot.py:418-420
            raise FloatingPointError(f"reference loss is {result['loss']}")
        self.optimizer.zero_grad()  # main_ibot.py:432-440 (fp32 branch)
        loss.backward()
        if cfg["clip_grad"]:
            official_clip_gradients(self.student, cfg["clip_grad"])
        official_cancel_gradients_last_layer(EPOCH, self.student, cfg["freeze_last_layer"])
        self.optimizer.step()
        self._ema(self.momentum_schedule[it])
        return result

    @torch.no_grad()
    def _ema(self, m: float) -> None:
        """Official teacher EMA (main_ibot.py:380-390, 451-455): parameters of common names, one update each."""
        names_q, params_q = zip(*self.student.named_parameters())
        names_k, params_k = zip(*self.teacher.named_parameters())
        names_common = list(set(names_q) & set(names_k))
        params_q = [p for n, p in zip(names_q, params_q) if n in names_common]
        params_k = [p for n, p in zip(names_k, params_k) if n in names_common]
        for param_q, param_k in zip(params_q, params_k):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def build_harnesses(precision: str, *, arch: str, batch: int, out_dim: int, local_crops: int, seed: int,
                    device: torch.device, ours_attention: str = "trainer", ours_compile: bool = False
                    ) -> tuple[OursStep, OfficialStep, Batch, dict[str, Any]]:
    """Ours and the official step from the same initial weights, plus the synthetic batch and config.

    ``ours_attention``: ``trainer`` (the trainer's kernel choice) or ``fused``/``explicit`` (forced);
    ``ours_compile``: ours with ``pretrain.compile: true`` (torch.compile of both backbones).
    """
    cfg = step_config(out_dim, local_crops, batch, precision)
    torch.manual_seed(seed)
    student, teacher = (m.to(device) for m in build_models(cfg, {"arch": arch, "patch_size": PATCH}))
    reference = OfficialStep(student, teacher, cfg, device)  # deep copy before ours trains
    ours = OursStep(student, teacher, cfg, device)
    if ours_attention != "trainer":
        for model in (ours.student, ours.teacher):
            model.backbone.set_fused_attention(ours_attention == "fused")
    if ours_compile:  # as Trainer.__init__ does for pretrain.compile
        for model in (ours.student, ours.teacher):
            model.backbone.compile()
    return ours, reference, synthetic_batch(cfg, device, seed), cfg
