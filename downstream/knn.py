"""Weighted k-NN classification on frozen features (the DINO/iBOT ``eval_knn.py`` protocol).

Features: the backbone in eval mode, final-norm [CLS] token, L2-normalised; images resized
(bicubic) to ``resize`` and centre-cropped to ``crop`` (256/224 in the paper), ImageNet
normalisation. Each val image votes over its ``k`` most cosine-similar train images with weights
``exp(cos / T)`` (T = 0.07); reported for k ∈ {10, 20, 100, 200} (k capped at the train size),
top-1 and top-5 (top-5 only with ≥ 5 classes). ``top1_k20`` is the number reported in the paper.

    python -m downstream.knn --checkpoint W.pth --data /path/to/imagenet --out results/.../knn/metrics.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from downstream.cli import stage_main
from downstream.features import (build_eval_backbone, cls_features, dataset_label, eval_transform,
                                 extract_features, image_folder, log, make_loader, pick_device)
from ibot.distributed import barrier, init_distributed, is_main
from ibot.metrics import write_metrics
from ibot.stages import stage_defaults

__all__ = ["DEFAULTS", "REPORTED_K", "protocol_label", "knn_classifier", "run", "main"]

#: Paper defaults (eval_knn.py): workflow/schemas/knn.schema.yaml, the one source of default values.
DEFAULTS: dict[str, Any] = stage_defaults("knn")
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


def run(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
        checkpoint_key: str | None, data: str, out: str, run: str, model: str, seed: int) -> dict[str, float]:
    """Stage entry (inside the launched job): extract features, k-NN, write metrics.json."""
    init_distributed()
    started = time.time()
    torch.manual_seed(seed)
    device = pick_device()
    transform = eval_transform(config["resize"], config["crop"])
    train_set = image_folder(data, "train", transform)
    val_set = image_folder(data, "val", transform)
    if train_set.classes != val_set.classes:
        raise ValueError(f"dataset {data}: train/ and val/ have different class folders")
    num_classes = len(train_set.classes)
    log(f"[knn] {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; device {device}")

    backbone = build_eval_backbone(model_spec, checkpoint, checkpoint_key, int(config["crop"])).to(device)
    bank_device = device if (device.type == "cuda" and config["features_on_gpu"]) else torch.device("cpu")
    features = {}
    for name, dataset in (("train", train_set), ("val", val_set)):
        loader = make_loader(dataset, int(config["batch_size_per_gpu"]), shuffle=False,
                             num_workers=int(config["num_workers"]))
        feats, labels = extract_features(lambda x: cls_features(backbone, x), loader, len(dataset), device=device,
                                         precision=config["precision"], desc=f"knn {name} features",
                                         out_device=bank_device)
        features[name] = (torch.nn.functional.normalize(feats, dim=1, p=2), labels)
    del backbone

    metrics: dict[str, float] = {}
    if is_main():
        results = knn_classifier(*features["train"], *features["val"], ks=config["nb_knn"],
                                 temperature=float(config["temperature"]), num_classes=num_classes,
                                 chunk_size=int(config["chunk_size"]))
        for k, (t1, t5) in results.items():
            metrics[f"top1_k{k}"] = t1
            if t5 is not None:
                metrics[f"top5_k{k}"] = t5
            log(f"[knn] {k}-NN (k used {min(k, len(train_set))}): top-1 {t1:.2f}"
                + (f", top-5 {t5:.2f}" if t5 is not None else ""))
        if REPORTED_K not in results:
            raise ValueError(f"knn.nb_knn must include the reported k={REPORTED_K} (got {config['nb_knn']})")
        write_metrics(
            out, run=run, model=model, stage="knn", task="knn", dataset=dataset_label(data, num_classes),
            protocol=protocol_label(config), metrics=metrics, config=config,
            wall_time_s=time.time() - started, checkpoint=checkpoint,
            extra={"reported": f"top1_k{REPORTED_K}", "num_train": len(train_set), "num_val": len(val_set),
                   "num_classes": num_classes, "effective_k": {str(k): min(k, len(train_set)) for k in results},
                   "feature": "final-norm [CLS], L2-normalised", "img_size": [int(config["resize"]),
                                                                               int(config["crop"])]})
        log(f"[knn] wrote {Path(out)}")
    barrier()
    return metrics


def main(argv: Sequence[str] | None = None) -> Any:
    return stage_main("knn", "downstream.knn:run", DEFAULTS, argv,
                      description="Weighted k-NN classification on frozen [CLS] features (iBOT/DINO protocol).")


if __name__ == "__main__":
    main()
