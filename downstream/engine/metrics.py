"""Exact classification metrics: per-sample top-k hits gathered across processes and de-duplicated by
sample index (a padding ``DistributedSampler`` repeats samples), the evaluation loop of a classifier,
and the best/last epoch of a training history."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from downstream.engine.setup import autocast, progress
from ibot.distributed import all_gather_cat

__all__ = ["topk_correct", "gather_correct", "evaluate", "best_and_last"]


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int]) -> Tensor:
    """[B, len(ks)] bool: is the target among the top-k predictions (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hits = top.eq(targets.view(-1, 1))
    return torch.stack([hits[:, :min(k, kmax)].any(dim=1) for k in ks], dim=1)


def gather_correct(correct: Tensor, index: Tensor, num_samples: int) -> Tensor:
    """Gather per-sample results ``[B, ...]`` from every rank and de-duplicate by sample index.

    Returns ``[num_samples, ...]`` (float) in dataset order; exact under a padding DistributedSampler.
    """
    correct = all_gather_cat(correct.float().contiguous())
    index = all_gather_cat(index.to(correct.device))
    out = torch.full((num_samples, *correct.shape[1:]), float("nan"), device=correct.device)
    out.index_copy_(0, index, correct)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_samples: int, device: torch.device, precision: str,
             desc: str = "val") -> dict[str, float]:
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


def best_and_last(history: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The best evaluated epoch (earliest on ties: the official "Max accuracy") and the last one."""
    evaluated = [r for r in history if "top1" in r]
    return max(evaluated, key=lambda r: r["top1"]), evaluated[-1]
