"""Shared plumbing of the dense stages: mmengine runtime settings taken from the project config and
the train → test run inside our launcher job. (Per-model values: the model recipes, config/paper/.)

Live curves (:func:`enable_tensorboard`): mmengine's LoggerHook already logs every ``log_interval``
iterations (a line with ``eta`` in the log, the scalars to the visualizer). A TensorBoard backend
sends those scalars to ``<stage dir>/tb/`` through :class:`ibot.tensorboard.ScalarWriter`, which
mmengine's own ``TensorboardVisBackend`` does not do exactly: after a requeue it would append a new
event file next to the killed attempt's, duplicating every step logged after the last checkpoint.
Here a hook tells the backend, before the first resumed iteration, where the run resumed, and the
earlier attempts' steps from there on are superseded. The final test metrics go to ``tb/test/``
(rewritten by every test run: a rerun of a finished stage tests again).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["CONFIG_DIR", "resolved_out_indices", "env_world_size", "norm_cfg", "per_gpu_batch", "configure_runtime",
           "set_dataloader_workers", "enable_tensorboard", "train_and_test"]

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


TB_BACKEND, TB_HOOK = "IBOTTensorboardVisBackend", "IBOTTensorboardResumeHook"
_TB_REGISTERED: list[bool] = []


def enable_tensorboard(cfg, tb_dir: Path) -> None:
    """Add the TensorBoard backend (scalars to ``tb_dir``) and its resume hook to an mmengine Config.

    Validation metrics are logged at the iteration (``log_metric_by_epoch=False``, as the
    segmentation base config does): every scalar of the run is then on one step axis, the axis
    the resume point is given in.
    """
    _register_tensorboard()
    cfg.visualizer.vis_backends = [*cfg.visualizer.get("vis_backends", []),
                                   dict(type=TB_BACKEND, name="tensorboard", save_dir=str(tb_dir))]
    cfg.custom_hooks = [*cfg.get("custom_hooks", []), dict(type=TB_HOOK, tb_dir=str(tb_dir))]
    cfg.default_hooks.logger.log_metric_by_epoch = False


def _register_tensorboard() -> None:
    """Define and register (once, in mmengine's root registries) the backend and the hook."""
    if _TB_REGISTERED:
        return
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS, VISBACKENDS
    from mmengine.visualization.vis_backend import BaseVisBackend

    from ibot.tensorboard import ScalarWriter

    class TensorboardScalars(BaseVisBackend):
        """mmengine backend writing scalars through ``ScalarWriter``; opened at the first scalar,
        once :class:`TensorboardResume` has set ``resume_step`` (``None``: append)."""

        def __init__(self, save_dir: str) -> None:
            super().__init__(save_dir)
            self.resume_step: int | None = None
            self._writer: ScalarWriter | None = None
            self._skipped: set[str] = set()

        @property
        def experiment(self) -> ScalarWriter | None:
            return self._writer

        def _init_env(self) -> None:
            pass  # nothing before the first scalar: the resume step is not known at build time

        def add_config(self, config, **kwargs) -> None:
            pass  # the runner dumps the resolved config to the work dir

        def add_scalar(self, name: str, value, step: int = 0, **kwargs) -> None:
            self.add_scalars({name: value}, step)

        def add_scalars(self, scalar_dict: dict, step: int = 0, file_path: str | None = None, **kwargs) -> None:
            scalars = {}
            for name, value in scalar_dict.items():
                if _is_scalar(value):
                    scalars[name] = float(value)
                elif name not in self._skipped:  # mmengine's TensorboardVisBackend skips these too
                    self._skipped.add(name)
                    logging.getLogger(__name__).warning("TensorBoard: %s is not a number (%s); not written",
                                                        name, type(value).__name__)
            if self._writer is None:
                self._writer = ScalarWriter(self._save_dir, resume_step=self.resume_step)
                self.resume_step = None  # a reopened writer (after close) appends
            self._writer.add(scalars, step)

        def close(self) -> None:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    class TensorboardResume(Hook):
        """Before the first (resumed) iteration: the backend supersedes earlier attempts' steps past
        the resume point (train scalars are logged at ``iter + 1``). After a test: its metrics."""

        priority = "VERY_HIGH"

        def __init__(self, tb_dir: str) -> None:
            self.tb_dir = Path(tb_dir)

        def before_train(self, runner) -> None:
            backend = runner.visualizer.get_backend("tensorboard")
            if backend is not None:
                backend.resume_step = runner.iter + 1

        def after_test_epoch(self, runner, metrics=None) -> None:
            trained = not (isinstance(runner._train_loop, dict) or runner._train_loop is None)
            scalars = {f"test/{k}": float(v) for k, v in (metrics or {}).items() if _is_scalar(v)}
            with ScalarWriter(self.tb_dir / "test", resume_step=0) as writer:
                writer.add(scalars, runner.iter if trained else 0)

    VISBACKENDS.register_module(name=TB_BACKEND, module=TensorboardScalars, force=True)
    HOOKS.register_module(name=TB_HOOK, module=TensorboardResume, force=True)
    _TB_REGISTERED.append(True)


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


def train_and_test(cfg) -> tuple[dict[str, float], list[Any]]:
    """Build the runner, train (resuming from work_dir if possible), then test; returns the metrics and
    the test evaluator's metric objects (what they keep of the evaluation: :mod:`downstream.dense.evidence`)."""
    from mmengine.runner import Runner

    from downstream.dense import registry  # noqa: F401  (registers our modules before building)

    trust_work_dir(cfg.work_dir)
    runner = Runner.from_cfg(cfg)
    runner.train()
    # test() resumes from work_dir/last_checkpoint: the final weights (CheckpointHook save_last)
    metrics = runner.test()
    logging.getLogger(__name__).info("test metrics: %s", metrics)
    # IoUMetric returns float32 values rounded to 2 decimals: keep them at that precision
    scalars = {k: round(float(v), 4) for k, v in (metrics or {}).items() if _is_scalar(v)}
    return scalars, list(runner.test_loop.evaluator.metrics)


def _is_scalar(value: Any) -> bool:
    """Python or numpy/torch real scalars (IoUMetric returns numpy float32, CocoMetric floats)."""
    if isinstance(value, (bool, str)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return getattr(value, "ndim", 0) == 0
