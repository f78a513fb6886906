"""Linear probing on frozen features with a one-pass learning-rate sweep (iBOT ``eval_linear_multi.py``;
Tab. 1). The protocol and the sweep are :mod:`downstream.engine.linear`.

Outputs beside ``metrics.json``: ``per_head.csv`` (every head at every evaluation) and ``head.pth``
(the best head, the input of the robustness stages). Training state is checkpointed after every
epoch in ``work/`` and a rerun resumes from it. Live TensorBoard curves in ``tb/`` (step = epochs
done): ``linear/train_loss/lr_<lr>`` per head, ``linear/train_loss_mean``, ``linear/lr_factor`` (the
cosine factor: each head's lr is its scaled lr times it) and, at each evaluation,
``linear/acc_top1/lr_<lr>`` per head, ``linear/acc_top1_best_head`` (this epoch),
``linear/acc_top1_best`` (so far; ``linear/acc_top5_best`` with 5 classes or more).
"""

from __future__ import annotations

from downstream.engine.data import dataset_label
from downstream.engine.linear import protocol_label, save_probe, train_probe
from downstream.engine.setup import build_eval_backbone, log, pick_device, seed_everything
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_evidence

__all__ = ["run"]


def run(ctx: StageContext) -> dict[str, float]:
    """Train the sweep, pick the best head, write per_head.csv, head.pth and metrics.json."""
    config, device = ctx.config, pick_device()
    seed_everything(ctx.seed)  # a random-init backbone (no checkpoint) is rebuilt from meta['seed'] when loading
    backbone = build_eval_backbone(ctx.model, ctx.checkpoint, int(config["crop"])).to(device)
    result = train_probe(backbone, ctx.data_root, config, device=device, seed=ctx.seed,
                         state_file=ctx.work.path / "linear_state.pth", fingerprint=ctx.work.digest, tb_dir=ctx.tb_dir)
    save_probe(result, ctx.dir, config, ctx.model, ctx.seed)
    best = result.best
    intervals, baselines = accuracy_evidence(result.metrics(), result.val_labels, result.num_classes)
    ctx.write_metrics(
        task="linear", dataset=dataset_label(ctx.data_root, result.num_classes), protocol=protocol_label(config),
        metrics=result.metrics(), intervals=intervals, baselines=baselines,
        extra={"best_lr": best["lr"], "best_scaled_lr": best["scaled_lr"], "best_epoch": best["epoch"],
               "best_head": best["head"], "global_batch": result.global_batch, "feature_dim": result.feature_dim,
               "num_classes": result.num_classes, "num_train": result.num_train, "num_val": result.num_val,
               "per_head": result.per_head(), "per_head_csv": "per_head.csv", "head": "head.pth"})
    log(f"[linear] best top-1 {best['top1']:.2f} (lr {best['lr']:g}, epoch {best['epoch']})")
    return result.metrics()
