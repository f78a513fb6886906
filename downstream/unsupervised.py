"""Unsupervised classification on ImageNet val (paper Tab.5; official ``evaluation/unsupervised/unsup_cls.py``).

Official protocol (bytedance/ibot at da316d8; ``run.sh imagenet_unsup_cls``, run.sh:213-225,
``evaluation/README.md:51-56``): every val image (``Resize(256, bicubic)`` + ``CenterCrop(224)``,
unsup_cls.py:80-85) goes through the frozen backbone and the pretrained teacher projection head
(``MultiCropWrapper(backbone, DINOHead(embed_dim, out_dim))`` loaded from the checkpoint's ``teacher``,
unsup_cls.py:111-119: the [CLS] branch ``mlp`` → L2 norm → ``last_layer``); its cluster is the argmax
of that output (:133-134). Metrics against the true classes (:22-30), in percent: NMI, ARI and FMI
(scikit-learn ``normalized_mutual_info_score``, ``adjusted_rand_score``, ``fowlkes_mallows_score``) and
ACC after matching clusters to classes one-to-one with the Hungarian algorithm (:33-71, there with
``munkres``; here ``scipy.optimize.linear_sum_assignment``).

The paper's model has ``out_dim`` 1000 = the number of classes (README.md:56: "to ensure one-to-one
assignment"), and the official cost matrix is square (``n_clusters`` = number of classes, :28, :64).
:func:`cluster_accuracy` takes the contingency table of the clusters that occur × the classes, which
may be rectangular (the embedded model: out_dim 512 on 10 classes): the matching pairs
``min(clusters, classes)`` of them maximising the matched count, and every image of an unmatched cluster
counts as an error. With as many clusters as classes it is the official matching (the official cost
``|cluster| - count`` differs from ``-count`` by a constant over any perfect matching).

Heads: our pretraining's ``heads.pth`` beside the backbone, or an official full ``checkpoint.pth``
(:func:`ibot.checkpoint.locate_heads`, :func:`ibot.checkpoint.build_pretrained_head`: strict). A
random-init model (no checkpoint) clusters with a random-init head of the official shape (the
random-init row of the tables).

Evidence (:mod:`ibot.uncertainty`): the Wilson interval of ACC (:func:`clustering_evidence` says why
NMI/ARI/FMI have none); the baseline is the same cluster sizes assigned independently of the images
(the clusters shuffled over the images, mean of :data:`SHUFFLES` draws), which is far from 0 for NMI
and ACC with many clusters on few images.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from downstream.engine.data import dataset_label, eval_transform, image_folder, make_loader
from downstream.engine.features import extract_features
from downstream.engine.setup import build_eval_backbone, log, pick_device
from ibot.checkpoint import build_pretrained_head, locate_heads
from ibot.distributed import is_main
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_interval, baseline

__all__ = ["SHUFFLES", "protocol_label", "cluster_accuracy", "clustering_metrics", "clustering_evidence", "run"]

#: Draws of the shuffled-clusters baseline.
SHUFFLES = 20


def protocol_label(config: Mapping[str, Any], out_dim: int) -> str:
    """What this run is: the head's output size (the clusters) and the image sizes, e.g. the paper's
    ``teacher-cls-head-argmax,out_dim=1000,256/224``."""
    return f"teacher-cls-head-argmax,out_dim={int(out_dim)},{int(config['resize'])}/{int(config['crop'])}"


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> tuple[float, dict[int, int]]:
    """Accuracy (fraction) after the best one-to-one cluster → class matching, and that matching.

    Rectangular when the numbers of (occurring) clusters and classes differ: see the module docstring.
    """
    from scipy.optimize import linear_sum_assignment

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1 or not len(labels):
        raise ValueError(f"labels {labels.shape} and clusters {clusters.shape}: expected two equal 1-D arrays")
    class_ids, class_index = np.unique(labels, return_inverse=True)
    cluster_ids, cluster_index = np.unique(clusters, return_inverse=True)
    counts = np.zeros((len(cluster_ids), len(class_ids)), dtype=np.int64)
    np.add.at(counts, (cluster_index, class_index), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = {int(cluster_ids[r]): int(class_ids[c]) for r, c in zip(rows, cols)}
    return float(counts[rows, cols].sum()) / len(labels), mapping


def clustering_metrics(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """NMI, ARI, FMI and ACC in percent (unsup_cls.py:22-30)."""
    from sklearn import metrics

    acc, _ = cluster_accuracy(labels, clusters)
    return {"nmi": 100.0 * float(metrics.normalized_mutual_info_score(labels, clusters)),
            "ari": 100.0 * float(metrics.adjusted_rand_score(labels, clusters)),
            "fmi": 100.0 * float(metrics.fowlkes_mallows_score(labels, clusters)),
            "acc": 100.0 * acc}


def clustering_evidence(labels: np.ndarray, clusters: np.ndarray, seed: int = 0
                        ) -> tuple[dict[str, dict], dict[str, dict]]:
    """The Wilson interval of ACC over the images and the shuffled-clusters baseline of every metric.

    NMI, ARI and FMI get no interval: a bootstrap duplicates images, and duplicates raise them (NMI of
    a resample lies above the estimate in nearly every draw, so neither the percentile nor the BCa
    interval is valid); ACC is a count of correctly matched images.
    """
    metrics = clustering_metrics(labels, clusters)
    intervals = {"acc": accuracy_interval(metrics["acc"], len(labels))}
    rng = np.random.default_rng(seed)
    shuffled = [clustering_metrics(labels, rng.permutation(clusters)) for _ in range(SHUFFLES)]
    baselines = {name: baseline(float(np.mean([m[name] for m in shuffled])), "clusters shuffled over the images")
                 for name in metrics}
    return intervals, baselines


def run(ctx: StageContext) -> dict[str, float]:
    """Cluster every val image, score, write metrics.json."""
    config, data = ctx.config, ctx.data_root
    key = ctx.checkpoint.network if ctx.checkpoint else None  # the head of the network the backbone is
    heads = locate_heads(config["heads"], ctx.checkpoint.path if ctx.checkpoint else None)
    device = pick_device()
    val_set = image_folder(data, "val", eval_transform(config["resize"], config["crop"]))
    torch.manual_seed(ctx.seed)
    backbone = build_eval_backbone(ctx.model, ctx.checkpoint, int(config["crop"])).to(device)
    if heads is None:  # random init: a random-init head of the official shape (seeded above)
        from ibot.models.head import build_head
        head = build_head(backbone.embed_dim, {}, teacher=True)
    else:
        head = build_pretrained_head(heads, key, backbone.embed_dim)
    head = head.to(device).eval()
    out_dim = int(head.out_dim)
    log(f"[unsupervised] {len(val_set)} val images, {len(val_set.classes)} classes; {key or 'teacher'} "
        f"head of {heads}: {out_dim} clusters; device {device}")

    def assign(images: torch.Tensor) -> torch.Tensor:  # the cluster id as a 1-wide float feature (exact < 2^24)
        return head.forward_cls(backbone(images)[:, 0]).argmax(dim=-1, keepdim=True).float()

    loader = make_loader(val_set, int(config["batch_size_per_gpu"]), shuffle=False, num_workers=int(config["num_workers"]))
    clusters, labels = extract_features(assign, loader, len(val_set), device=device, precision=config["precision"],
                                        desc="unsupervised val")
    if not is_main():
        return {}
    clusters_np, labels_np = clusters[:, 0].long().numpy(), labels.numpy()
    metrics = clustering_metrics(labels_np, clusters_np)
    used = np.unique(clusters_np)
    log(f"[unsupervised] NMI {metrics['nmi']:.2f}, ARI {metrics['ari']:.2f}, FMI {metrics['fmi']:.2f}, "
        f"ACC {metrics['acc']:.2f} ({len(used)} of {out_dim} clusters used)")
    intervals, baselines = clustering_evidence(labels_np, clusters_np, seed=ctx.seed)
    ctx.write_metrics(
        task="unsup_cls", dataset=dataset_label(data, len(val_set.classes)), protocol=protocol_label(config, out_dim),
        metrics=metrics, intervals=intervals, baselines=baselines,
        extra={"heads": str(heads) if heads else "random init", "head_key": key or "teacher", "out_dim": out_dim,
               "num_classes": len(val_set.classes), "num_val": len(val_set), "clusters_used": int(len(used)),
               "assignment": "one-to-one Hungarian (scipy linear_sum_assignment) over the occurring clusters x "
                             "classes; rectangular when they differ, images of unmatched clusters count as errors"})
    return metrics
