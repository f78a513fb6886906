"""fp16 training with fp32 master weights and a dynamic loss scale: the official ``--enable_deepspeed``
fine-tuning (iBOT Tab. 11 "DS"), without DeepSpeed.

Official (bytedance/ibot ``evaluation/classification_layer_decay``): run_class_finetuning.py:202-213 and
:564-575 hand the layer-decay parameter groups to ``deepspeed.initialize`` with the config written by
utils.py:475-504 (``create_ds_config``): Adam in AdamW mode and
``"fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 7, "loss_scale_window": 128}``
(utils.py:496-501; ``loss_scale`` 0 = dynamic), no ``gradient_clipping`` key. DeepSpeed's fp16 engine
then casts the whole module (LayerNorm included) to fp16 and its ``FP16_Optimizer``
(deepspeed/runtime/fp16/fused_optimizer.py) keeps fp32 copies of the parameters for the optimizer.
The training loop feeds fp16 images without autocast (engine_for_finetuning.py:70-73) and calls
``model.backward(loss)`` / ``model.step()`` (:85-88). :class:`Fp16MasterOptimizer` is that optimizer
around any torch optimizer (ours: timm AdamW with the layer-decay groups, the same update as
DeepSpeed's FusedAdam ``adam_w_mode``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Fp16MasterOptimizer", "DS_FP16_CONFIG"]

#: The official DeepSpeed fp16 section (utils.py:496-501); ``min_loss_scale`` is DeepSpeed's default (1),
#: the official config sets none.
DS_FP16_CONFIG = {"loss_scale": 0, "initial_scale_power": 7, "loss_scale_window": 128, "min_loss_scale": 1}


class Fp16MasterOptimizer:
    """Wraps ``optimizer`` built over the fp16 parameters of a ``model.half()`` network.

    The wrapped optimizer's groups are switched to fp32 master copies (its lr/weight-decay/lr_scale keys
    stay, so schedulers drive :attr:`param_groups` as before). Per update: :meth:`backward` on the
    loss x scale (gradients accumulate in the fp16 ``.grad``), then :meth:`step`: an inf/nan fp16 gradient
    skips the update and halves the scale; otherwise the gradients go to the masters in fp32, are
    unscaled (and clipped on the unscaled norm when ``clip_grad`` > 0), the optimizer steps the
    masters and they are copied back into the fp16 parameters. The scale doubles after
    ``scale_window`` overflow-free steps (DeepSpeed ``FP16_Optimizer._update_scale``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *,
                 initial_scale_power: int = DS_FP16_CONFIG["initial_scale_power"],
                 scale_window: int = DS_FP16_CONFIG["loss_scale_window"],
                 min_scale: float = DS_FP16_CONFIG["min_loss_scale"], clip_grad: float = 0.0) -> None:
        self.optimizer = optimizer
        self.fp16_groups: list[list[Tensor]] = []
        self.fp32_groups: list[list[Tensor]] = []
        for group in optimizer.param_groups:
            params = list(group["params"])
            if any(p.dtype != torch.float16 for p in params):
                raise ValueError("Fp16MasterOptimizer: build the optimizer on the model after model.half()")
            # DeepSpeed halves the module first, so the masters start as the fp16 values (exact in fp32)
            masters = [p.detach().float().requires_grad_(True) for p in params]
            self.fp16_groups.append(params)
            self.fp32_groups.append(masters)
            group["params"] = masters
        self.scale_factor = 2.0
        self.cur_scale = 2.0 ** int(initial_scale_power)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.clip_grad = float(clip_grad or 0.0)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.overflow = False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.fp16_groups:
            for p in group:
                p.grad = None

    def backward(self, loss: Tensor) -> None:
        """``(loss.float() * scale).backward()`` (DeepSpeed ``FP16_Optimizer.backward``)."""
        (loss.float() * self.cur_scale).backward()

    def _update_scale(self, overflow: bool) -> None:
        """DeepSpeed ``FP16_Optimizer._update_scale`` (dynamic scale): halve on overflow (floor
        ``min_scale``); double when ``scale_window`` steps passed since the last overflow."""
        if overflow:
            self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            self.last_overflow_iter = self.cur_iter
        else:
            stable = self.cur_iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.scale_window == 0:
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    @torch.no_grad()
    def step(self) -> bool:
        """One update; returns True when it was skipped for an inf/nan gradient."""
        grads = [p.grad for group in self.fp16_groups for p in group if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        # the gradients were computed at the scale before this update (DeepSpeed's fused FP16_Optimizer
        # updates the scale first and unscales by the new one: on a doubling step its gradient is halved;
        # we unscale by the scale the loss was multiplied by)
        used_scale = self.cur_scale
        self._update_scale(self.overflow)
        if self.overflow:
            self.zero_grad()
            return True
        for params, masters in zip(self.fp16_groups, self.fp32_groups):
            for p, m in zip(params, masters):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        master_grads = [m.grad for group in self.fp32_groups for m in group if m.grad is not None]
        combined = used_scale
        if self.clip_grad > 0 and master_grads:
            # FP16_Optimizer.unscale_and_clip_grads: one division by scale x max(1, norm / clip_grad)
            norms = torch.stack([torch.linalg.vector_norm(g) for g in master_grads])
            total_norm = float(torch.linalg.vector_norm(norms))
            clip = (total_norm / used_scale + 1e-6) / self.clip_grad
            if clip > 1:
                combined = clip * used_scale
        for g in master_grads:
            g.mul_(1.0 / combined)
        self.optimizer.step()
        for params, masters in zip(self.fp16_groups, self.fp32_groups):
            for p, m in zip(params, masters):
                m.grad = None
                p.copy_(m)  # fp32 -> fp16 rounding
        return False

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the fp32 masters and the loss-scale state (a resumed run
        continues with the same masters, moments and scale)."""
        return {"optimizer": self.optimizer.state_dict(), "fp32_groups": [[m.detach().clone() for m in g]
                                                                          for g in self.fp32_groups],
                "cur_scale": self.cur_scale, "cur_iter": self.cur_iter, "last_overflow_iter": self.last_overflow_iter,
                "scale_window": self.scale_window, "min_scale": self.min_scale, "clip_grad": self.clip_grad}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for masters, saved, params in zip(self.fp32_groups, state["fp32_groups"], self.fp16_groups):
            if len(masters) != len(saved):
                raise ValueError("Fp16MasterOptimizer.load_state_dict: parameter groups differ")
            for m, s, p in zip(masters, saved, params):
                m.copy_(s)
                p.copy_(s)
        self.cur_scale = float(state["cur_scale"])
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])
        self.scale_window = int(state["scale_window"])
        self.min_scale = float(state["min_scale"])
        self.clip_grad = float(state["clip_grad"])

    def __repr__(self) -> str:
        return f"Fp16MasterOptimizer(scale={self.cur_scale:g}, window={self.scale_window}, {self.optimizer!r})"
