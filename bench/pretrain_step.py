"""Throughput of one full iBOT pretraining step: ours vs an official-equivalent reference.

A step is what one iteration of ``main_ibot.py`` does once the batch is in memory: teacher and
student forward (2 global + L local crops), loss, backward, per-parameter gradient clipping,
AdamW step and the teacher EMA. Data loading is excluded: every step reuses one synthetic batch
(random images, official block masks from ``MaskGenerator``).

* **ours**: ``Trainer.train_step`` itself, on a Trainer built without data or checkpoints.
* **reference**: the bytedance/ibot iteration transcribed: ``MultiCropWrapper`` semantics (the
  head projects *every* token of every crop: global crops -> [CLS] + all patch logits, local crops
  -> [CLS] of the head output on all their tokens), the official ``iBOTLoss`` on the full
  [G*B, N, P] patch logits, explicit softmax(q k^T) v attention (timm ``fused_attn = False``),
  the official per-parameter clipping loop (one ``.item()`` per parameter) and EMA loop.

Both start from the same weights (the reference is a deep copy of ours), see the same inputs and
masks and the same drop-path draws, so their first-step losses must agree (checked and printed).
Steps are timed interleaved (alternating order) so that load from other processes hits both alike.

Usage: ``python bench/pretrain_step.py --precision fp32,bf16 --batch 8 --json out.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibot.data.masking import MaskGenerator  # noqa: E402
from ibot.loss import IBOTLoss  # noqa: E402
from ibot.models.head import loss_patch_out_dim  # noqa: E402
from ibot.train.pretrain import (DEFAULTS, IBOTModel, Trainer, _precision, _shared_parameters,  # noqa: E402
                                 build_models, select_attention_kernel)
from ibot.train.schedules import cancel_last_layer_gradients, cosine_schedule, param_groups  # noqa: E402

#: Steps run at this epoch: past ``freeze_last_layer`` (1), so the output layers train as in most of a run.
EPOCH = 1
ITERS_PER_EPOCH = 1000
GLOBAL_CROPS, GLOBAL_SIZE, LOCAL_SIZE, PATCH = 2, 224, 96, 16


# -- configuration and inputs --------------------------------------------------------------------
def bench_config(out_dim: int, local_crops: int, batch: int, precision: str) -> dict[str, Any]:
    """Official ViT-S/16 recipe flags (README command: shared head, no last-layer norm, block masks)."""
    return {**DEFAULTS, "out_dim": out_dim, "patch_out_dim": out_dim, "shared_head": True,
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


def make_loss(cfg: dict[str, Any], cls: type[IBOTLoss] = IBOTLoss) -> IBOTLoss:
    """The loss module as ``Trainer.__init__`` builds it (``cls`` swaps in the official transcription)."""
    return cls(cfg["out_dim"], loss_patch_out_dim(cfg), cfg["global_crops_number"], cfg["local_crops_number"],
               cfg["warmup_teacher_temp"], cfg["teacher_temp"], cfg["warmup_teacher_patch_temp"],
               cfg["teacher_patch_temp"], cfg["warmup_teacher_temp_epochs"], cfg["epochs"],
               lambda1=cfg["lambda1"], lambda2=cfg["lambda2"], mim_start_epoch=cfg["pred_start_epoch"])


def make_schedules(cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lr, weight decay and teacher momentum per iteration, as ``Trainer.__init__``."""
    epochs = cfg["epochs"]
    lr = cosine_schedule(cfg["lr"] * cfg["batch_size_per_gpu"] / 256.0, cfg["min_lr"], epochs, ITERS_PER_EPOCH,
                         warmup_epochs=cfg["warmup_epochs"])
    wd = cosine_schedule(cfg["weight_decay"], cfg["weight_decay_end"], epochs, ITERS_PER_EPOCH)
    momentum = cosine_schedule(cfg["momentum_teacher"], 1.0, epochs, ITERS_PER_EPOCH)
    return lr, wd, momentum


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """bf16/fp16 autocast, or a disabled autocast for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)


# -- ours: Trainer.train_step, unchanged ------------------------------------------------------------
class OursStep(Trainer):
    """A Trainer without dataset, sampler or checkpoints; ``train_step`` is the real one."""

    def __init__(self, student: IBOTModel, teacher: IBOTModel, cfg: dict[str, Any],
                 device: torch.device) -> None:  # pylint: disable=super-init-not-called
        self.cfg, self.spec, self.device = cfg, {}, device
        self.work_dir = Path("bench-no-checkpoints")
        self.autocast_dtype, use_scaler = _precision(cfg, device)
        self.student, self.teacher, self.student_ddp = student, teacher, student
        select_attention_kernel((student, teacher), device, self.autocast_dtype)  # the trainer's choice
        self.ema_pairs = _shared_parameters(student, teacher)
        self.loss = make_loss(cfg).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(student))
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.lr_schedule, self.wd_schedule, self.momentum_schedule = make_schedules(cfg)
        self.iters_per_epoch = ITERS_PER_EPOCH

    def step(self, batch: Batch, it: int) -> float:
        """One training step; returns the loss."""
        return self.train_step(batch.images, batch.masks, EPOCH, it)["loss"]


# -- reference: the official bytedance/ibot iteration ----------------------------------------------
class OfficialIBOTLoss(IBOTLoss):
    """``main_ibot.py`` ``iBOTLoss.forward``/``update_center`` transcribed (full [G*B, N, P] patch logits).

    Inherits only the constructor (centre buffers, temperature schedules) from ours."""

    def forward(self, student_output: tuple[Tensor, Tensor], teacher_output: tuple[Tensor, Tensor],  # type: ignore[override]
                student_local_cls: Tensor | None, student_mask: Sequence[Tensor], epoch: int) -> dict[str, Tensor]:
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        student_cls_c = (student_cls / self.student_temp).chunk(self.ncrops)
        student_patch_c = (student_patch / self.student_temp).chunk(self.ngcrops)
        temp, temp2 = self.teacher_temp_schedule[epoch], self.teacher_temp2_schedule[epoch]
        teacher_cls_c = F.softmax((teacher_cls - self.center) / temp, dim=-1).detach().chunk(self.ngcrops)
        teacher_patch_c = F.softmax((teacher_patch - self.center2) / temp2, dim=-1).detach().chunk(self.ngcrops)
        total_loss1, n_loss_terms1, total_loss2, n_loss_terms2 = 0, 0, 0, 0
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
        self.official_update_center(teacher_cls, teacher_patch)
        return dict(cls=total_loss1, patch=total_loss2, loss=total_loss1 + total_loss2)

    @torch.no_grad()
    def official_update_center(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """Official centre EMA (single process: the all_reduce is the identity)."""
        cls_center = torch.sum(teacher_cls, dim=0, keepdim=True) / len(teacher_cls)
        self.center = self.center * self.center_momentum + cls_center * (1 - self.center_momentum)
        patch_center = torch.sum(teacher_patch.mean(1), dim=0, keepdim=True) / len(teacher_patch)
        self.center2 = self.center2 * self.center_momentum2 + patch_center * (1 - self.center_momentum2)


def disable_fused_attention(model: nn.Module) -> int:
    """Make every timm attention compute softmax(q k^T) v explicitly (official ViT); returns the count."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
            count += 1
    return count


def multicrop_forward(model: IBOTModel, crops: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Official ``MultiCropWrapper`` on one resolution group: backbone, then the head on ALL tokens."""
    return model.head(model.backbone(crops, mask=mask))


def official_clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """``utils.clip_gradients``: per-parameter norm, one host sync per parameter."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


class OfficialStep:
    """One ``train_one_epoch`` iteration of bytedance/ibot (single process, no DDP wrapper)."""

    def __init__(self, student: IBOTModel, teacher: IBOTModel, cfg: dict[str, Any], device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.autocast_dtype, _ = _precision(cfg, device)
        self.student, self.teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        self.unfused = disable_fused_attention(self.student) + disable_fused_attention(self.teacher)
        self.loss = make_loss(cfg, OfficialIBOTLoss).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student))  # utils.get_params_groups: same groups
        self.lr_schedule, self.wd_schedule, self.momentum_schedule = make_schedules(cfg)

    def forward_loss(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Teacher, student (globals, then locals through backbone + head) and the official loss."""
        g = self.cfg["global_crops_number"]
        globals_, masks = torch.cat(batch.images[:g]), torch.cat(batch.masks[:g])
        with autocast(self.device, self.autocast_dtype):
            teacher_output = multicrop_forward(self.teacher, globals_)
            student_output = multicrop_forward(self.student, globals_, mask=masks)
            student_local_cls = (multicrop_forward(self.student, torch.cat(batch.images[g:]))[0]
                                 if len(batch.images) > g else None)
            losses = self.loss(student_output, teacher_output, student_local_cls, batch.masks[:g], EPOCH)
        outputs = {"student": student_output, "teacher": teacher_output, "local_cls": student_local_cls}
        return losses, outputs

    def step(self, batch: Batch, it: int, check: IBOTLoss | None = None) -> dict[str, float]:
        """One training step; returns the loss (and, given ``check``, that module's value on the same
        official-layout outputs, evaluated before the step's centre update)."""
        cfg = self.cfg
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr_schedule[it]
            if i == 0:
                group["weight_decay"] = self.wd_schedule[it]
        losses, outputs = self.forward_loss(batch)
        loss = losses["loss"]
        result = {"loss": loss.item()}
        if check is not None:
            result["check"] = official_layout_value(check, outputs, batch, cfg["global_crops_number"])
        if not math.isfinite(result["loss"]):
            raise FloatingPointError(f"reference loss is {result['loss']}")
        self.optimizer.zero_grad()
        loss.backward()
        if cfg["clip_grad"]:
            official_clip_gradients(self.student, cfg["clip_grad"])
        cancel_last_layer_gradients(self.student, EPOCH, cfg["freeze_last_layer"])
        self.optimizer.step()
        self._ema(self.momentum_schedule[it])
        return result

    @torch.no_grad()
    def _ema(self, m: float) -> None:
        """Official teacher EMA: common parameter names recomputed every step, one update per tensor."""
        names_q, params_q = zip(*self.student.named_parameters())
        names_k, params_k = zip(*self.teacher.named_parameters())
        names_common = list(set(names_q) & set(names_k))
        params_q = [p for n, p in zip(names_q, params_q) if n in names_common]
        params_k = [p for n, p in zip(names_k, params_k) if n in names_common]
        for param_q, param_k in zip(params_q, params_k):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


@torch.no_grad()
def official_layout_value(loss: IBOTLoss, outputs: dict[str, Any], batch: Batch, g: int) -> float:
    """Our ``IBOTLoss`` evaluated on the official [G*B, N, P] layout (a cross-check of both losses)."""
    state = copy.deepcopy(loss.state_dict())
    value = loss(tuple(t.detach() for t in outputs["student"]), outputs["teacher"],
                 outputs["local_cls"].detach() if outputs["local_cls"] is not None else None,
                 batch.masks[:g], EPOCH)["loss"].item()
    loss.load_state_dict(state)
    return value


# -- measurement -----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` GFLOP/s of an n x n matmul (the machine's attainable dense throughput)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def _sdpa_cpu_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                    *args: Any, **kwargs: Any) -> int:
    """CPU fused attention forward, counted with torch's SDPA formula (the CPU op is not registered)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_shape: Sequence[int], query_shape: Sequence[int], key_shape: Sequence[int],
                             value_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """CPU fused attention backward, counted with torch's SDPA backward formula."""
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


def counted(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` under ``FlopCounterMode``; returns (its result, total FLOPs)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
        result = fn()
    return result, counter.get_total_flops()


#: Largest first-step relative loss difference accepted in fp32 (bf16 is reported, not checked: the
#: official loss divides bf16 logits by the temperature in bf16, ours works in fp32).
FP32_LOSS_RTOL = 1e-5


@dataclass
class PrecisionResult:
    """Figures of one precision (step times in seconds; img/s and speedup from their medians)."""

    precision: str
    loss_ours: float
    loss_reference: float
    loss_ibotloss_official_layout: float  # our IBOTLoss on the reference's [G*B, N, P] outputs
    loss_rel_diff: float  # ours vs reference
    loss_ok: bool | None  # fp32: within FP32_LOSS_RTOL; bf16: None (not checked)
    flops_ours: int
    flops_reference: int
    matmul_gflop_s: float
    ours_step_s: list[float] = field(default_factory=list)
    reference_step_s: list[float] = field(default_factory=list)
    ours_img_s: float = 0.0
    reference_img_s: float = 0.0
    speedup: float = 0.0
    ours_tflop_s: float = 0.0
    ours_fraction_of_matmul: float = 0.0


def build_harnesses(precision: str, args: argparse.Namespace, device: torch.device
                    ) -> tuple[OursStep, OfficialStep, Batch, dict[str, Any]]:
    """Ours and the reference from the same initial weights, plus the synthetic batch and config."""
    cfg = bench_config(args.out_dim, args.local_crops, args.batch, precision)
    torch.manual_seed(args.seed)
    student, teacher = (m.to(device) for m in build_models(cfg, {"arch": args.arch, "patch_size": PATCH}))
    reference = OfficialStep(student, teacher, cfg, device)  # deep copy before ours trains
    ours = OursStep(student, teacher, cfg, device)
    if args.ours_attention != "trainer":  # what-if: force one attention kernel for ours
        for model in (ours.student, ours.teacher):
            model.backbone.set_fused_attention(args.ours_attention == "fused")
    return ours, reference, synthetic_batch(cfg, device, args.seed), cfg


def first_step(ours: OursStep, reference: OfficialStep, batch: Batch, cfg: dict[str, Any], it: int, seed: int,
               precision: str, matmul: float) -> PrecisionResult:
    """First (warmup) step of both under FLOP counting, with the same seed (same drop-path draws)."""
    torch.manual_seed(seed)
    loss_ours, flops_ours = counted(lambda: ours.step(batch, it))
    torch.manual_seed(seed)
    ref, flops_ref = counted(lambda: reference.step(batch, it, check=make_loss(cfg).to(ours.device)))
    rel = abs(loss_ours - ref["loss"]) / abs(ref["loss"])
    ok = rel <= FP32_LOSS_RTOL if precision == "fp32" else None
    verdict = {True: "IDENTICAL (OK)", False: f"MISMATCH (> {FP32_LOSS_RTOL:g})", None: "(bf16: not checked)"}[ok]
    print(f"[{precision}] first-step loss: ours {loss_ours:.7f}  reference {ref['loss']:.7f}  "
          f"IBOTLoss on reference outputs {ref['check']:.7f}  rel diff {rel:.2e} {verdict}  "
          f"[explicit attention in {reference.unfused} reference blocks]", flush=True)
    return PrecisionResult(precision, loss_ours, ref["loss"], ref["check"], rel, ok, flops_ours, flops_ref, matmul)


def bench_precision(precision: str, args: argparse.Namespace, device: torch.device, matmul: float) -> PrecisionResult:
    """Check the first-step loss, run the remaining warmup, then time both interleaved."""
    ours, reference, batch, cfg = build_harnesses(precision, args, device)
    it = EPOCH * ITERS_PER_EPOCH
    result = first_step(ours, reference, batch, cfg, it, args.seed + 1, precision, matmul)
    runners = {"ours": lambda i: ours.step(batch, i), "reference": lambda i: reference.step(batch, i)}
    for i in range(1, args.warmup):
        for run in runners.values():
            run(it + i)
    times = time_interleaved(runners, it + max(args.warmup, 1), args.steps, device)
    result.ours_step_s, result.reference_step_s = times["ours"], times["reference"]
    ours_s, ref_s = statistics.median(times["ours"]), statistics.median(times["reference"])
    result.ours_img_s, result.reference_img_s = args.batch / ours_s, args.batch / ref_s
    result.speedup = ref_s / ours_s
    result.ours_tflop_s = result.flops_ours / ours_s / 1e12
    result.ours_fraction_of_matmul = result.flops_ours / ours_s / (matmul * 1e9)
    print(f"[{precision}] ours {result.ours_img_s:.2f} img/s  reference {result.reference_img_s:.2f} img/s  "
          f"speedup {result.speedup:.2f}x  (steps ours {_fmt(times['ours'])}, reference {_fmt(times['reference'])})",
          flush=True)
    return result


def time_interleaved(runners: dict[str, Callable[[int], Any]], first_it: int, steps: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each runner, alternating which runs first at every step."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for step in range(steps):
        for name in names if step % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            runners[name](first_it + step)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _fmt(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}s" for v in values)


def print_table(results: Sequence[PrecisionResult], args: argparse.Namespace) -> None:
    """Compact summary, one row per precision."""
    print(f"\n{args.arch}/{PATCH}, out_dim {args.out_dim}, batch {args.batch}, 2x{GLOBAL_SIZE} + "
          f"{args.local_crops}x{LOCAL_SIZE} crops, {args.device}, {torch.get_num_threads()} threads, "
          f"ours attention {args.ours_attention}")
    header = (f"{'precision':<9} {'ours img/s':>10} {'ref img/s':>10} {'speedup':>8} {'loss ours':>11} "
              f"{'loss ref':>11} {'rel diff':>9} {'GFLOP ours':>10} {'GFLOP ref':>10} {'TFLOP/s':>8} "
              f"{'mm GFLOP/s':>10} {'of mm':>6}")  # GFLOP: one step, forward + backward
    print(header)
    for r in results:
        print(f"{r.precision:<9} {r.ours_img_s:>10.2f} {r.reference_img_s:>10.2f} {r.speedup:>7.2f}x "
              f"{r.loss_ours:>11.6f} {r.loss_reference:>11.6f} {r.loss_rel_diff:>9.1e} {r.flops_ours / 1e9:>10.0f} "
              f"{r.flops_reference / 1e9:>10.0f} {r.ours_tflop_s:>8.3f} {r.matmul_gflop_s:>10.0f} "
              f"{r.ours_fraction_of_matmul:>6.1%}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps; the first is the loss check")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--out-dim", type=int, default=8192)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--ours-attention", choices=["trainer", "fused", "explicit"], default="trainer",
                        help="ours' attention kernel: the trainer's choice (fused SDPA, explicit on CPU under "
                             "autocast), or forced fused/explicit (what-if)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 8 if args.device == "cpu" else 64
    return args


def main(argv: Sequence[str] | None = None) -> list[PrecisionResult]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if unknown := set(precisions) - set(dtypes):
        raise SystemExit(f"unsupported precision(s) {sorted(unknown)}; expected fp32 and/or bf16")
    matmul = {p: matmul_gflops(device, dtypes[p]) for p in precisions}
    print(f"matmul 2048^2 ({torch.get_num_threads()} threads): "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in matmul.items()), flush=True)
    results = [bench_precision(p, args, device, matmul[p]) for p in precisions]
    print_table(results, args)
    if any(r.loss_ok is False for r in results):
        print(f"ERROR: fp32 first-step losses differ by more than {FP32_LOSS_RTOL:g} (relative)", file=sys.stderr)
    if args.json:
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "results": [asdict(r) for r in results]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(1 if any(r.loss_ok is False for r in main()) else 0)
