"""Throughput of one full iBOT pretraining step: ours vs the official step (the test oracle).

A step is what one iteration of ``main_ibot.py`` does once the batch is in memory: teacher and
student forward (2 global + L local crops), loss, backward, per-parameter gradient clipping,
AdamW step and the teacher EMA. Data loading is excluded: every step reuses one synthetic batch
(random images, official block masks from ``MaskGenerator``).

Both sides come from ``tests/official_ibot_step.py`` (the oracle ``tests/test_pretrain.py`` checks
our trainer against):

* **ours**: ``Trainer.train_step`` itself, on a Trainer built without data or checkpoints.
* **reference**: the bytedance/ibot iteration transcribed (file:line citations there): the head
  projects *every* token of every crop, the official ``iBOTLoss`` on the full [G*B, N, P] patch
  logits, explicit softmax(q k^T) v attention (timm ``fused_attn = False``), the official
  per-parameter clipping loop (one ``.item()`` per parameter) and EMA loop.

Both start from the same weights (the reference is a deep copy of ours), see the same inputs and
masks and the same drop-path draws, so their first-step losses must agree (checked and printed).
Steps are timed interleaved (alternating order) so that load from other processes hits both alike.

Usage: ``python bench/pretrain_step.py --precision fp32,bf16 --batch 8 --json out.json``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and the oracle module under tests/

from ibot.loss import IBOTLoss  # noqa: E402
from ibot.models.head import loss_patch_out_dim  # noqa: E402
from official_ibot_step import (EPOCH, GLOBAL_SIZE, ITERS_PER_EPOCH, LOCAL_SIZE, PATCH, Batch,  # noqa: E402
                                OfficialStep, OursStep, build_harnesses)


def our_loss(cfg: dict[str, Any]) -> IBOTLoss:
    """A fresh ``IBOTLoss`` as ``Trainer.__init__`` builds it (for the official-layout cross-check)."""
    return IBOTLoss(cfg["out_dim"], loss_patch_out_dim(cfg), cfg["global_crops_number"], cfg["local_crops_number"],
                    cfg["warmup_teacher_temp"], cfg["teacher_temp"], cfg["warmup_teacher_patch_temp"],
                    cfg["teacher_patch_temp"], cfg["warmup_teacher_temp_epochs"], cfg["epochs"],
                    lambda1=cfg["lambda1"], lambda2=cfg["lambda2"], mim_start_epoch=cfg["pred_start_epoch"])


@torch.no_grad()
def official_layout_value(loss: IBOTLoss, outputs: dict[str, Any], batch: Batch, g: int) -> float:
    """Our ``IBOTLoss`` evaluated on the official [G*B, N, P] layout (a cross-check of both losses)."""
    value = loss(tuple(t.detach() for t in outputs["student"]), outputs["teacher"],
                 outputs["local_cls"].detach() if outputs["local_cls"] is not None else None,
                 batch.masks[:g], EPOCH)["loss"].item()
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
    ours_mfu: float | None = None  # model FLOP utilisation: achieved / the device's data-sheet peak


def harnesses(precision: str, args: argparse.Namespace, device: torch.device
              ) -> tuple[OursStep, OfficialStep, Batch, dict[str, Any]]:
    """Ours and the reference from the same initial weights (the oracle's ``build_harnesses``)."""
    return build_harnesses(precision, arch=args.arch, batch=args.batch, out_dim=args.out_dim,
                           local_crops=args.local_crops, seed=args.seed, device=device,
                           ours_attention=args.ours_attention, ours_compile=args.compile)


#: Dense peak TFLOP/s (tensor cores, no sparsity) per precision of the GPUs this is run on: the
#: denominator of the model FLOP utilisation (MFU). NVIDIA data sheets (H100/H200 SXM, A100 SXM).
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 67.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}}


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The data-sheet peak of this GPU for ``precision`` (None on a CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(precision) for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def first_step(ours: OursStep, reference: OfficialStep, batch: Batch, cfg: dict[str, Any], it: int, seed: int,
               precision: str, matmul: float) -> PrecisionResult:
    """First (warmup) step of both under FLOP counting, with the same seed (same drop-path draws)."""
    torch.manual_seed(seed)
    loss_ours, flops_ours = counted(lambda: ours.step(batch, it))
    torch.manual_seed(seed)
    check = our_loss(cfg).to(ours.device)
    g = cfg["global_crops_number"]
    ref, flops_ref = counted(lambda: reference.step(
        batch, it, before_update=lambda outputs: official_layout_value(check, outputs, batch, g)))
    rel = abs(loss_ours - ref["loss"]) / abs(ref["loss"])
    ok = rel <= FP32_LOSS_RTOL if precision == "fp32" else None
    verdict = {True: "IDENTICAL (OK)", False: f"MISMATCH (> {FP32_LOSS_RTOL:g})", None: "(bf16: not checked)"}[ok]
    print(f"[{precision}] first-step loss: ours {loss_ours:.7f}  reference {ref['loss']:.7f}  "
          f"IBOTLoss on reference outputs {ref['check']:.7f}  rel diff {rel:.2e} {verdict}  "
          f"[explicit attention in {reference.unfused} reference blocks]", flush=True)
    return PrecisionResult(precision, loss_ours, ref["loss"], ref["check"], rel, ok, flops_ours, flops_ref, matmul)


def bench_precision(precision: str, args: argparse.Namespace, device: torch.device, matmul: float) -> PrecisionResult:
    """Check the first-step loss, run the remaining warmup, then time both interleaved."""
    ours, reference, batch, cfg = harnesses(precision, args, device)
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
    peak = args.peak_tflops or device_peak_tflops(device, precision)
    result.ours_mfu = result.ours_tflop_s / peak if peak else None
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
              f"{'mm GFLOP/s':>10} {'of mm':>6} {'MFU':>6}")  # GFLOP: one step, forward + backward
    print(header)
    for r in results:
        print(f"{r.precision:<9} {r.ours_img_s:>10.2f} {r.reference_img_s:>10.2f} {r.speedup:>7.2f}x "
              f"{r.loss_ours:>11.6f} {r.loss_reference:>11.6f} {r.loss_rel_diff:>9.1e} {r.flops_ours / 1e9:>10.0f} "
              f"{r.flops_reference / 1e9:>10.0f} {r.ours_tflop_s:>8.3f} {r.matmul_gflop_s:>10.0f} "
              f"{r.ours_fraction_of_matmul:>6.1%} {(f'{r.ours_mfu:.1%}' if r.ours_mfu else 'n/a'):>6}")


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
    parser.add_argument("--compile", action="store_true", help="ours with pretrain.compile: true (torch.compile)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the MFU column (default: known GPUs' data sheets)")
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
