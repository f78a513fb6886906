"""Shared plumbing of the dense stages: mmengine runtime settings taken from the project config and
the train → test run inside our launcher job. (Per-model values: the model recipes, config/paper/.)"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["CONFIG_DIR", "resolved_out_indices", "env_world_size", "norm_cfg", "per_gpu_batch", "configure_runtime",
           "set_dataloader_workers", "train_and_test"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

def resolved_out_indices(backbone_cfg: Mapping[str, Any]) -> list[int]:
    """The blocks an ``IBOTViTDense`` config will output (its default when ``out_indices`` is None)."""
    from downstream.dense.backbone import default_out_indices
    from ibot.models.vision_transformer import ARCHITECTURES

    if backbone_cfg.get("out_indices") is not None:
        return list(backbone_cfg["out_indices"])
    return default_out_indices(int(backbone_cfg.get("depth") or ARCHITECTURES[backbone_cfg["arch"]].depth))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def norm_cfg(world_size: int) -> dict[str, Any]:
    """SyncBN only when distributed on GPUs (the official configs: SyncBN on 8 GPUs); torch's
    SyncBatchNorm has no CPU kernel, so CPU processes keep per-process BN."""
    sync = world_size > 1 and torch.cuda.is_available()
    return dict(type="SyncBN" if sync else "BN", requires_grad=True)


def per_gpu_batch(total: int, world_size: int, section: str) -> int:
    if total % world_size:
        raise ValueError(f"{section}.batch_size: {total} is not divisible by the {world_size} processes")
    return total // world_size


def set_dataloader_workers(loader: dict, num_workers: int) -> None:
    loader["num_workers"] = int(num_workers)
    loader["persistent_workers"] = int(num_workers) > 0


def configure_runtime(cfg, *, stage: str, work_dir: Path, seed: int, amp: bool, log_interval: int,
                      val_interval: int, world_size: int) -> None:
    """Runner-level settings common to detection and segmentation (mutates the mmengine Config)."""
    cfg.work_dir = str(work_dir)
    cfg.launcher = "pytorch" if world_size > 1 else "none"
    cfg.env_cfg.dist_cfg = dict(backend="nccl" if torch.cuda.is_available() else "gloo")
    cfg.randomness = dict(seed=int(seed), deterministic=False)
    cfg.resume = True  # continue from work_dir/last_checkpoint after a requeue
    cfg.load_from = None
    # unique names: several runners may live in one process (tests, debug cluster)
    tag = f"{stage}_{uuid.uuid4().hex[:8]}"
    cfg.experiment_name = tag
    cfg.visualizer.name = f"visualizer_{tag}"
    if world_size > 1 and not torch.cuda.is_available():  # CPU processes: DDP without device ids
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                     find_unused_parameters=bool(cfg.get("find_unused_parameters", False)))
    cfg.default_hooks.logger.interval = int(log_interval)
    if amp and torch.cuda.is_available():
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if val_interval and val_interval > 0:
        cfg.train_cfg.val_interval = int(val_interval)
    else:  # evaluate once, after training, with the test loop (the reported numbers)
        cfg.val_dataloader = None
        cfg.val_cfg = None
        cfg.val_evaluator = None


_TRUSTED_DIRS: set[Path] = set()


def _load_local_checkpoint(filename: str, map_location=None):
    """mmengine's local checkpoint loader with an explicit ``weights_only`` choice.

    torch >= 2.6 loads with ``weights_only=True`` by default, which refuses mmengine's own resume
    checkpoints (they pickle the message hub's ``HistoryBuffer`` and bound methods). Files in a
    work directory this stage created (``trust_work_dir``) are our own and load in full; every
    other file keeps ``weights_only=True``.
    """
    path = Path(os.path.expanduser(filename)).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{filename} can not be found.")
    trusted = any(path.is_relative_to(root) for root in _TRUSTED_DIRS)
    return torch.load(path, map_location=map_location, weights_only=not trusted)


def trust_work_dir(work_dir: str | Path) -> None:
    """Let mmengine resume from the checkpoints it writes in ``work_dir`` (see above)."""
    from mmengine.runner.checkpoint import CheckpointLoader

    _TRUSTED_DIRS.add(Path(work_dir).resolve())
    CheckpointLoader.register_scheme(prefixes="", loader=_load_local_checkpoint, force=True)


def train_and_test(cfg) -> dict[str, float]:
    """Build the runner, train (resuming from work_dir if possible), then test; returns the metrics."""
    from mmengine.runner import Runner

    from downstream.dense import registry  # noqa: F401  (registers our modules before building)

    trust_work_dir(cfg.work_dir)
    runner = Runner.from_cfg(cfg)
    runner.train()
    # test() resumes from work_dir/last_checkpoint: the final weights (CheckpointHook save_last)
    metrics = runner.test()
    logging.getLogger(__name__).info("test metrics: %s", metrics)
    # IoUMetric returns float32 values rounded to 2 decimals: keep them at that precision
    return {k: round(float(v), 4) for k, v in (metrics or {}).items() if _is_scalar(v)}


def _is_scalar(value: Any) -> bool:
    """Python or numpy/torch real scalars (IoUMetric returns numpy float32, CocoMetric floats)."""
    if isinstance(value, (bool, str)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return getattr(value, "ndim", 0) == 0
