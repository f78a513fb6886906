"""Runtime pieces every evaluation uses: device, precision, seeding, logging, the evaluated backbone."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from torch import nn

from ibot.checkpoint import BackboneCheckpoint
from ibot.distributed import is_main, local_rank
from ibot.models.specs import ModelSpec
from ibot.progress import progress  # re-exported: the stages' one progress helper

__all__ = ["PRECISIONS", "pick_device", "autocast", "resolve_precision", "seed_everything", "log", "progress",
           "build_eval_backbone"]

#: ``deepspeed_fp16``: the official ``--enable_deepspeed`` fine-tuning (fp16 model, fp32 master weights, dynamic
#: loss scale: :mod:`downstream.engine.fp16_master`); only the fine-tuning loop trains with it.
PRECISIONS = ("fp32", "bf16", "fp16", "deepspeed_fp16")


def pick_device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def autocast(precision: str, device: torch.device):
    """Autocast context for ``precision`` (``fp32``: none; ``fp16`` falls back to fp32 on CPU).

    ``deepspeed_fp16`` (an fp16 model): fp16 autocast on every device, as the official evaluation of the
    DeepSpeed model (engine_for_finetuning.py:168 ``torch.cuda.amp.autocast()``) casts fp32 images; torch
    runs fp16 ops on CPU too. Its training forward runs without autocast (the loop feeds fp16 images).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "deepspeed_fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(precision: str, device: torch.device, tag: str) -> str:
    """The precision a training loop runs: fp16 (with a grad scaler) needs a GPU, fp32 stands in on CPU.

    ``deepspeed_fp16`` runs as asked on CPU too (torch 2.9 has CPU fp16 kernels for every op of the ViT
    fine-tuning, slower than fp32): a CPU run of that ablation is still the fp16-model recipe.
    """
    if precision == "fp16" and device.type != "cuda":
        log(f"[{tag}] precision fp16 needs a GPU: running in fp32 on CPU")
        return "fp32"
    if precision == "deepspeed_fp16" and device.type != "cuda":
        log(f"[{tag}] precision deepspeed_fp16 on CPU: fp16 model and kernels (slow), as on GPU")
    return precision


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def log(message: str) -> None:
    """One line to stdout from the main process (the launcher streams it to the Snakemake log)."""
    if is_main():
        print(message, flush=True)


def build_eval_backbone(model: ModelSpec | Mapping[str, Any], checkpoint: BackboneCheckpoint | None,
                        default_img_size: int) -> nn.Module:
    """Frozen evaluation backbone (eval mode, no grad) built at the checkpoint's native image size, so
    the weights load unchanged; other crops are handled at run time by the backbone's official bicubic
    positional-embedding interpolation, as in the official evaluation scripts."""
    from ibot.models.pretrained import build_pretrained_backbone

    model = ModelSpec.of(model)
    img_size = checkpoint.native_img_size(model.patch_size, default_img_size) if checkpoint else default_img_size
    backbone = build_pretrained_backbone(model, checkpoint, img_size=img_size)
    backbone.eval()
    for param in backbone.parameters():
        param.requires_grad_(False)
    return backbone
