"""Weighted k-NN classification on frozen features (the DINO/iBOT ``eval_knn.py`` protocol): used by
the k-NN stage and the semi-supervised k-NN protocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from downstream.engine.data import eval_transform, make_loader, train_val_folders
from downstream.engine.features import cls_features, extract_features
from ibot.distributed import is_main

__all__ = ["REPORTED_K", "protocol_label", "knn_classifier", "KnnResult", "knn_on_folder"]

#: The k of the number reported in the paper (``top1_k20``).
REPORTED_K = 20


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, from its config (the results join the paper's numbers only to the paper's
    protocol, ``k=20,T=0.07,cls,256/224``): reported k, temperature, feature, resize/crop."""
    return f"k={REPORTED_K},T={float(config['temperature']):g},cls,{int(config['resize'])}/{int(config['crop'])}"


@torch.no_grad()
def knn_classifier(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                   ks: int | Sequence[int], temperature: float = 0.07, num_classes: int | None = None,
                   chunk_size: int = 500) -> dict[int, tuple[float, float | None]]:
    """Weighted k-NN accuracy (percent) for every ``k``: ``{k: (top1, top5 or None)}``.

    Features must already be L2-normalised. The similarity is computed ``chunk_size`` test rows at
    a time (memory ``chunk_size × n_train``); one ``topk`` with the largest k serves every k.
    ``k`` is capped at the number of train samples; top-5 is None with fewer than 5 classes.
    """
    ks = [ks] if isinstance(ks, int) else list(ks)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    effective = {k: min(k, n_train) for k in ks}
    kmax = max(effective.values())
    train_features_t = train_features.T.contiguous()
    top1 = {k: 0 for k in ks}
    top5 = {k: 0 for k in ks}
    for start in range(0, n_test, chunk_size):
        features = test_features[start:start + chunk_size]
        targets = test_labels[start:start + chunk_size]
        similarity = features @ train_features_t
        distances, indices = similarity.topk(kmax, dim=1, largest=True, sorted=True)
        neighbours = train_labels[indices]
        weights = (distances / temperature).exp()
        for k in ks:
            kk = effective[k]
            scores = torch.zeros(features.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
            scores.scatter_add_(1, neighbours[:, :kk], weights[:, :kk])
            predictions = scores.topk(min(5, num_classes), dim=1).indices
            correct = predictions.eq(targets.view(-1, 1))
            top1[k] += int(correct[:, :1].sum())
            top5[k] += int(correct[:, :5].sum())
    return {k: (100.0 * top1[k] / n_test, 100.0 * top5[k] / n_test if num_classes >= 5 else None) for k in ks}


@dataclass(frozen=True)
class KnnResult:
    accuracy: dict[int, tuple[float, float | None]]  # k -> (top-1, top-5 or None); empty off the main process
    num_train: int
    num_val: int
    num_classes: int
    val_labels: list[int]  # the true classes of val, in order (the interval and baseline of its accuracies)

    def metrics(self) -> dict[str, float]:
        """``top1_k<k>`` (and ``top5_k<k>`` with at least 5 classes) for every k."""
        out: dict[str, float] = {}
        for k, (top1, top5) in self.accuracy.items():
            out[f"top1_k{k}"] = top1
            if top5 is not None:
                out[f"top5_k{k}"] = top5
        return out


def knn_on_folder(backbone: nn.Module, data: str | Path, config: Mapping[str, Any], *, device: torch.device,
                  tag: str = "knn") -> KnnResult:
    """Extract L2-normalised [CLS] features of ``<data>/train`` and ``<data>/val``, then classify val
    (main process) for every k of ``nb_knn``; the reported k must be among them."""
    if REPORTED_K not in config["nb_knn"]:
        raise ValueError(f"knn.nb_knn must include the reported k={REPORTED_K} (got {config['nb_knn']})")
    transform = eval_transform(config["resize"], config["crop"])
    train_set, val_set = train_val_folders(data, transform, transform)
    bank_device = device if (device.type == "cuda" and config["features_on_gpu"]) else torch.device("cpu")
    features = {}
    for name, dataset in (("train", train_set), ("val", val_set)):
        loader = make_loader(dataset, int(config["batch_size_per_gpu"]), shuffle=False,
                             num_workers=int(config["num_workers"]))
        feats, labels = extract_features(lambda x: cls_features(backbone, x), loader, len(dataset), device=device,
                                         precision=config["precision"], desc=f"{tag} {name} features",
                                         out_device=bank_device)
        features[name] = (nn.functional.normalize(feats, dim=1, p=2), labels)
    accuracy = {}
    if is_main():
        accuracy = knn_classifier(*features["train"], *features["val"], ks=config["nb_knn"],
                                  temperature=float(config["temperature"]), num_classes=len(train_set.classes),
                                  chunk_size=int(config["chunk_size"]))
    return KnnResult(accuracy, len(train_set), len(val_set), len(train_set.classes), list(val_set.targets))
