"""Part-wise linear probing (official ``analysis/linear_part/eval.py``; paper Sec. 4.3.1, Fig. 5): how
linearly separable the classes are from the few patches the [CLS] token attends to, i.e. how much
semantics single parts carry (iBOT's gain over DINO grows as k shrinks).

Feature per k (:func:`downstream.engine.features.partwise_features`): the last block's [CLS]-to-patch
attention averaged over heads ranks the patch tokens; the mean of the k top-ranked tokens of the last block
(without the final LayerNorm, as the official model) is the feature. All k of ``topk`` train in one pass on
one backbone forward per batch, each with the linear stage's sweep (:mod:`downstream.engine.linear`: SGD,
cosine, 45 learning rates, best (lr, epoch) on val).

Metrics: ``top1_k<k>`` (and ``top5_k<k>`` with 5 classes or more) for every k, ``top1`` the best k's.
``per_head.csv`` beside ``metrics.json`` (every head at every evaluation, its k in ``group``).
"""

from __future__ import annotations

from typing import Any, Mapping

from downstream.engine.data import dataset_label
from downstream.engine.features import partwise_features
from downstream.engine.linear import ProbeFeatures, save_history, train_probe
from downstream.engine.setup import build_eval_backbone, log, pick_device, seed_everything
from ibot.config import OFFICIAL_LR_GRID
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_evidence

__all__ = ["run", "protocol_label"]


def protocol_label(config: Mapping[str, Any]) -> str:
    """e.g. ``top-k patches (k 1,7,14,56,112,196; no final norm),sgd,100ep,lr-sweep(45),256/224``."""
    ks = ",".join(str(k) for k in config["topk"])
    order = "bottom" if config["reverse_top"] else "top"
    norm = "final norm" if config["final_norm"] else "no final norm"
    lrs = len(config["lrs"] or OFFICIAL_LR_GRID)
    return (f"{order}-k patches (k {ks}; {norm}),sgd,{int(config['epochs'])}ep,lr-sweep({lrs}),"
            f"{int(config['resize'])}/{int(config['crop'])}")


def run(ctx: StageContext) -> dict[str, float]:
    """Train one sweep per k on the part-wise features, write per_head.csv and metrics.json."""
    config, device = ctx.config, pick_device()
    seed_everything(ctx.seed)
    backbone = build_eval_backbone(ctx.model, ctx.checkpoint, int(config["crop"])).to(device)
    topk = [int(k) for k in config["topk"]]
    patches = (int(config["crop"]) // ctx.model.patch_size) ** 2
    if max(topk) > patches:
        raise ValueError(f"linear_part.topk: k = {max(topk)} but a {config['crop']} px crop has {patches} patches")
    features = ProbeFeatures(
        lambda images: partwise_features(backbone, images, topk, final_norm=bool(config["final_norm"]),
                                         reverse=bool(config["reverse_top"])),
        dim=int(backbone.embed_dim), groups=tuple(f"k{k}" for k in topk))
    result = train_probe(backbone, ctx.data_root, config, device=device, seed=ctx.seed,
                         state_file=ctx.work.path / "linear_part_state.pth", fingerprint=ctx.work.digest,
                         tb_dir=ctx.tb_dir, features=features)
    save_history(result, ctx.dir)
    by_k = result.best_by_group()
    metrics: dict[str, float] = {"top1": result.best["top1"]}
    for group, row in by_k.items():
        metrics[f"top1_{group}"] = row["top1"]
        if result.num_classes >= 5:
            metrics[f"top5_{group}"] = row["top5"]
    intervals, baselines = accuracy_evidence(metrics, result.val_labels, result.num_classes)
    ctx.write_metrics(
        task="linear_part", dataset=dataset_label(ctx.data_root, result.num_classes), protocol=protocol_label(config),
        metrics=metrics, intervals=intervals, baselines=baselines,
        extra={"best_k": int(result.best["group"].removeprefix("k")), "best_lr": result.best["lr"],
               "best_epoch": result.best["epoch"],
               "per_k": {group: {"lr": row["lr"], "epoch": row["epoch"], "top1": row["top1"]}
                         for group, row in by_k.items()},
               "feature_dim": result.feature_dim, "global_batch": result.global_batch,
               "num_classes": result.num_classes, "num_train": result.num_train, "num_val": result.num_val,
               "patches": patches, "per_head_csv": "per_head.csv"})
    log("[linear_part] " + ", ".join(f"{group} top-1 {row['top1']:.2f}" for group, row in by_k.items()))
    return metrics
