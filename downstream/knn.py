"""Weighted k-NN classification on frozen features (the DINO/iBOT ``eval_knn.py`` protocol; Tab. 1).

Features: the backbone in eval mode, final-norm [CLS] token, L2-normalised; images resized
(bicubic) to ``resize`` and centre-cropped to ``crop`` (256/224 in the paper), ImageNet
normalisation. Each val image votes over its ``k`` most cosine-similar train images with weights
``exp(cos / T)`` (T = 0.07); reported for k ∈ {10, 20, 100, 200} (k capped at the train size),
top-1 and top-5 (top-5 only with ≥ 5 classes). ``top1_k20`` is the number reported in the paper
(:mod:`downstream.engine.knn`).
"""

from __future__ import annotations

import torch

from downstream.engine.data import dataset_label
from downstream.engine.knn import REPORTED_K, knn_on_folder, protocol_label
from downstream.engine.setup import build_eval_backbone, log, pick_device
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_evidence

__all__ = ["run"]


def run(ctx: StageContext) -> dict[str, float]:
    """Extract features, classify val by k-NN, write metrics.json."""
    config, device = ctx.config, pick_device()
    torch.manual_seed(ctx.seed)
    backbone = build_eval_backbone(ctx.model, ctx.checkpoint, int(config["crop"])).to(device)
    result = knn_on_folder(backbone, ctx.data_root, config, device=device)
    log(f"[knn] {result.num_train} train / {result.num_val} val images, {result.num_classes} classes; device {device}")
    for k, (top1, top5) in result.accuracy.items():
        log(f"[knn] {k}-NN (k used {min(k, result.num_train)}): top-1 {top1:.2f}"
            + (f", top-5 {top5:.2f}" if top5 is not None else ""))
    intervals, baselines = accuracy_evidence(result.metrics(), result.val_labels, result.num_classes)
    ctx.write_metrics(
        task="knn", dataset=dataset_label(ctx.data_root, result.num_classes), protocol=protocol_label(config),
        metrics=result.metrics(), intervals=intervals, baselines=baselines,
        extra={"reported": f"top1_k{REPORTED_K}", "num_train": result.num_train, "num_val": result.num_val,
               "num_classes": result.num_classes,
               "effective_k": {str(k): min(k, result.num_train) for k in result.accuracy},
               "feature": "final-norm [CLS], L2-normalised", "img_size": [int(config["resize"]), int(config["crop"])]})
    return result.metrics()
