"""iBOT objective: self-distillation on [CLS] across views plus masked-patch self-distillation (MIM).

Matches the official ``iBOTLoss`` (bytedance/ibot ``main_ibot.py``) value for value, including the
centre buffers (``center``, ``center2``: same names, so ``ibot_loss`` state dicts round-trip) and the
teacher temperature schedules. Differences are in how the same numbers are computed:

- the cross-view [CLS] term sums all (teacher view, student view) pairs at once instead of looping;
- the MIM term only touches masked tokens. Student (and optionally teacher) patch logits may be
  passed for masked tokens only, as rows ``[M, P]`` ordered like ``mask.nonzero()`` over the
  crop-major ``[G*B, N]`` mask, so the student head never projects unmasked tokens. The official
  layout (``[G*B, N, P]``) is accepted too and gathered to the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IBOTLoss", "teacher_temp_schedule", "flatten_masks"]


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, nepochs: int,
                          hold_epochs: int = 0) -> np.ndarray:
    """Per-epoch teacher temperature: ``warmup_temp`` for ``hold_epochs`` epochs, then a linear ramp
    over ``warmup_epochs`` epochs (``np.linspace``, both ends included), then ``temp``."""
    return np.concatenate((
        np.full(hold_epochs, warmup_temp),
        np.linspace(warmup_temp, temp, warmup_epochs),
        np.full(max(nepochs - warmup_epochs - hold_epochs, 0), temp),
    ))


def flatten_masks(masks: Tensor | Sequence[Tensor], ngcrops: int) -> Tensor:
    """Crop-major bool mask [G*B, N] from a tensor [G*B, (h, w | N)] or the first ``ngcrops`` of a list
    of per-crop masks [B, (h, w | N)] (the official list may also hold local-crop masks)."""
    if isinstance(masks, Tensor):
        return masks.flatten(1).bool()
    return torch.cat([m.flatten(1) for m in masks[:ngcrops]]).bool()


def _all_reduce_mean(total: Tensor, local_count: int) -> Tensor:
    """``total`` summed over processes, divided by the global count (official centre averaging)."""
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        world_size = dist.get_world_size()
    return total / (local_count * world_size)


class IBOTLoss(nn.Module):
    """Sum of the [CLS] distillation loss (``cls``, weight ``lambda1``) and the masked patch
    distillation loss (``patch``, weight ``lambda2``), with teacher centring and sharpening.

    Args mirror the official class: ``ngcrops``/``nlcrops`` global/local crops, teacher temperatures
    (``*2`` for patch tokens) warmed up over ``warmup_teacher_temp_epochs`` (the patch one is held at its
    warm-up value for the first ``mim_start_epoch`` epochs), centre EMA momenta ``center_momentum*``.

    Ablation knobs of the patch targets (defaults = official): ``patch_centering`` (False: no centre is
    subtracted from the teacher patch logits, sharpening only, paper Tab. 18 text; ``center2`` is still
    updated so checkpoints keep the same buffers) and ``patch_targets`` ('soft': the teacher distribution;
    'hard': its one-hot argmax, Tab. 18's hardmax row).
    """

    def __init__(self, out_dim: int, patch_out_dim: int, ngcrops: int, nlcrops: int, warmup_teacher_temp: float,
                 teacher_temp: float, warmup_teacher_temp2: float, teacher_temp2: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, center_momentum2: float = 0.9, lambda1: float = 1.0,
                 lambda2: float = 1.0, mim_start_epoch: int = 0, patch_centering: bool = True,
                 patch_targets: str = "soft") -> None:
        super().__init__()
        if patch_targets not in ("soft", "hard"):
            raise ValueError(f"patch_targets: {patch_targets!r}; expected 'soft' or 'hard'")
        self.patch_centering = patch_centering
        self.patch_targets = patch_targets
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.ngcrops = ngcrops
        self.nlcrops = nlcrops
        self.ncrops = ngcrops + nlcrops
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        # Warm-up: a too high teacher temperature makes early training unstable.
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.teacher_temp2_schedule = teacher_temp_schedule(
            warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs, hold_epochs=mim_start_epoch)

    def forward(self, student_output: tuple[Tensor, Tensor], teacher_output: tuple[Tensor, Tensor],
                student_local_cls: Tensor | None, student_mask: Tensor | Sequence[Tensor], epoch: int,
                teacher_patch_mean: Tensor | None = None, patch_targets: Tensor | None = None) -> dict[str, Tensor]:
        """Loss terms, then an in-place centre update (call order and arguments as official).

        Args:
            student_output: (global-crop [CLS] logits [G*B, K], patch logits [G*B, N, P] or the masked
                rows only [M, P]).
            teacher_output: (global-crop [CLS] logits [G*B, K], patch logits [G*B, N, P] or masked rows [M, P]).
            student_local_cls: local-crop [CLS] logits [L*B, K] or None.
            student_mask: per global crop masks (see ``flatten_masks``); True = masked.
            epoch: selects the teacher temperatures.
            teacher_patch_mean: per-image token mean of the teacher patch logits [G*B, P] for the centre;
                required when the teacher patch logits are given as masked rows only.
            patch_targets: offline MIM targets (ibot.tokenizers; paper Tab. 9/20): tokenizer ids of the
                masked tokens [M] (or of all tokens [G*B, N]); the patch term is then
                :meth:`target_patch_loss` instead of the teacher distillation (the centre still updates, unused).

        Returns:
            dict(cls=..., patch=..., loss=cls + patch).
        """
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        teacher_cls, teacher_patch = teacher_cls.detach(), teacher_patch.detach()
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        if teacher_patch_mean is None:
            if teacher_patch.dim() != 3:
                raise ValueError("masked-row teacher patch logits need teacher_patch_mean for the centre")
            teacher_patch_mean = teacher_patch.mean(dim=1, dtype=torch.float32)

        mask = flatten_masks(student_mask, self.ngcrops)
        loss_cls = self.cls_loss(student_cls, teacher_cls, float(self.teacher_temp_schedule[epoch]))
        if patch_targets is not None:
            loss_patch = self.target_patch_loss(student_patch, patch_targets, mask)
        else:
            loss_patch = self.patch_loss(student_patch, teacher_patch, mask, float(self.teacher_temp2_schedule[epoch]))
        self.update_center(teacher_cls, teacher_patch_mean)
        return dict(cls=loss_cls, patch=loss_patch, loss=loss_cls + loss_patch)

    def cls_loss(self, student_cls: Tensor, teacher_cls: Tensor, temp: float) -> Tensor:
        """``lambda1`` x mean over pairs (teacher global view q, student view v != q) of the batch-mean
        cross-entropy between centred/sharpened teacher and student [CLS] distributions.

        ``student_cls`` [(G+L)*B, K] (global crops first), ``teacher_cls`` [G*B, K], crop-major."""
        n_pairs = self.ngcrops * (self.ncrops - 1)
        if n_pairs == 0:
            return student_cls.new_zeros(())
        batch = teacher_cls.shape[0] // self.ngcrops
        teacher = F.softmax((teacher_cls.float() - self.center) / temp, dim=-1).view(self.ngcrops, batch, -1)
        student = F.log_softmax(student_cls.float() / self.student_temp, dim=-1).view(self.ncrops, batch, -1)
        # sum_q sum_{v != q} t_q . s_v = (sum_q t_q) . (sum_v s_v) - sum_q t_q . s_q, per image
        all_pairs = (teacher.sum(0) * student.sum(0)).sum(-1)
        same_view = (teacher * student[: self.ngcrops]).sum(-1).sum(0)
        return -(all_pairs - same_view).mean() / n_pairs * self.lambda1

    def patch_loss(self, student_patch: Tensor, teacher_patch: Tensor, mask: Tensor, temp: float) -> Tensor:
        """``lambda2`` x mean over global crops and images of the per-image mean (over masked patches)
        cross-entropy between teacher and student patch distributions of the same view; images without
        masked patches contribute 0 (official ``clamp(min=1)``).

        Patch logits are [G*B, N, P] or masked rows [M, P]; ``mask`` is the crop-major bool [G*B, N]."""
        counts = mask.sum(dim=-1)
        if student_patch.dim() == 3:
            student_patch = student_patch[mask]
        if teacher_patch.dim() == 3:
            teacher_patch = teacher_patch[mask]
        # official: softmax((teacher_patch - center2) / temp2) (main_ibot.py:535)
        centred = teacher_patch.float() - self.center2[0] if self.patch_centering else teacher_patch.float()
        student = F.log_softmax(student_patch.float() / self.student_temp, dim=-1)
        if self.patch_targets == "hard":  # one-hot argmax of softmax(centred / temp) = argmax of centred
            token_loss = -student.gather(-1, centred.argmax(dim=-1, keepdim=True)).squeeze(-1)
        else:
            token_loss = -(F.softmax(centred / temp, dim=-1) * student).sum(-1)  # [M]
        # Each masked token weighs 1 / (masked tokens of its image); rows follow the image order.
        weights = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts, output_size=token_loss.shape[0])
        return (token_loss * weights).sum() / mask.shape[0] * self.lambda2

    def target_patch_loss(self, student_patch: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """Offline-target MIM term (paper Tab. 9/20, App. E): ``lambda2`` x the same per-image averaging as
        :meth:`patch_loss` (mean over an image's masked tokens, then over images and global crops) of the
        cross-entropy between ``log_softmax(student / student_temp)`` and the one-hot tokenizer id; no
        centring or sharpening (a hard label has none).

        ``student_patch``: [G*B, N, V] or masked rows [M, V]; ``targets``: ids [M] in ``mask.nonzero()``
        order or [G*B, N] (or [G*B, h, w]) for all tokens; ``mask``: the crop-major bool [G*B, N]."""
        counts = mask.sum(dim=-1)
        if student_patch.dim() == 3:
            student_patch = student_patch[mask]
        if targets.dim() > 1:
            targets = targets.flatten(1)[mask]
        token_loss = F.cross_entropy(student_patch.float() / self.student_temp, targets.long(), reduction="none")
        weights = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts, output_size=token_loss.shape[0])
        return (token_loss * weights).sum() / mask.shape[0] * self.lambda2

    @torch.no_grad()
    def update_center(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """EMA of the teacher centres over all processes: ``center`` <- mean [CLS] logits of the global
        crops, ``center2`` <- mean over images of the per-image token-mean patch logits.

        ``teacher_patch`` is [G*B, N, P] (all tokens) or its token mean [G*B, P]."""
        cls_center = _all_reduce_mean(teacher_cls.float().sum(dim=0, keepdim=True), teacher_cls.shape[0])
        self.center.mul_(self.center_momentum).add_(cls_center * (1 - self.center_momentum))

        patch_mean = teacher_patch.mean(dim=1, dtype=torch.float32) if teacher_patch.dim() == 3 else teacher_patch.float()
        patch_center = _all_reduce_mean(patch_mean.sum(dim=0, keepdim=True), patch_mean.shape[0])
        self.center2.mul_(self.center_momentum2).add_(patch_center.unsqueeze(0) * (1 - self.center_momentum2))
