"""Per-iteration schedules and optimizer helpers, as in the official DINO/iBOT ``utils``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["cosine_schedule", "param_groups", "clip_gradients_per_param", "cancel_last_layer_gradients"]


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """Linear warmup from ``start_warmup`` to ``base`` over ``warmup_epochs``, then cosine to ``final``."""
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
    steps = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / len(steps)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * iters_per_epoch
    return schedule


def param_groups(model: nn.Module) -> list[dict]:
    """Official grouping: weight decay on >1-D weights only (first group; biases/norms/tokens excluded)."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or param.ndim == 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_param(model: nn.Module, clip: float) -> None:
    """Official semantics: each parameter's gradient is clipped to norm ``clip`` on its own."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    # clip / (norm + 1e-6), capped at 1, as foreach kernels: no host sync, a few launches in all (the
    # official loop syncs on every parameter's norm: utils.py clip_gradients)
    scales = torch._foreach_norm(grads, 2)
    torch._foreach_add_(scales, 1e-6)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, clip)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """No last-layer updates during the first ``freeze_last_layer`` epochs (stabilises early training)."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None
