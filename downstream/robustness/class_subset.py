"""ImageNet-A (Hendrycks et al., CVPR 2021) and ImageNet-R (ICCV 2021): top-1 over their 200-class subsets.

Layout ``<root>/<wnid>/*``. As in the official evaluation (hendrycks/natural-adv-examples
``eval.py``, copied by iBOT's ``analysis/natural_adv_examples/eval.py``) the 1000-way logits are
restricted to the classes present as folders (``output[:, indices_in_1k]``) and the prediction
is the argmax over that subset. The subset is found through the linear head's ``classes`` (wnid
list), so it works for any head class order; a wnid unknown to the head is an error. Transform:
the head's eval ``resize``/``crop`` (256/224), bilinear (the official script), ImageNet
normalisation. ImageNet-R is not part of iBOT's Tab. 8 and has no embedded set: enable the
``imagenet_r`` stage with ``data.imagenet_r`` pointing at the real set.

Metric: ``top1`` (percent).
"""

from __future__ import annotations

from typing import Sequence

import torch

from downstream.engine.setup import log
from downstream.robustness.common import (LabelledImages, RobustnessError, accumulate, class_folders, common_extra,
                                          folder_samples, percent, prepare, shard_loader, write_robustness_metrics)
from ibot.data.kinds import DATASET_KINDS
from ibot.distributed import is_main
from ibot.run.context import StageContext
from ibot.uncertainty import accuracy_evidence

__all__ = ["subset_indices", "run"]


def subset_indices(folder_wnids: Sequence[str], head_classes: Sequence[str], *, what: str) -> list[int]:
    """Head output index of every folder wnid (folder order = label order); unknown wnids are an error."""
    index = {wnid: i for i, wnid in enumerate(head_classes)}
    unknown = [w for w in folder_wnids if w not in index]
    if unknown:
        raise RobustnessError(f"{what}: class folders {unknown[:10]}{' ...' if len(unknown) > 10 else ''} are not "
                              f"classes of the linear head ({len(head_classes)} classes, e.g. "
                              f"{list(head_classes[:3])}); the head must be trained on the matching ImageNet classes")
    return [index[w] for w in folder_wnids]


def run(ctx: StageContext) -> dict[str, float]:
    """Top-1 with logits restricted to the dataset's classes (the stage's dataset: ImageNet-A or -R)."""
    kind, root = next(iter(ctx.data.items()))
    name, config = DATASET_KINDS[kind].title, ctx.config
    wnids = class_folders(root, what=f"{name} {root}")
    net, transform, sizes, device = prepare(ctx)
    indices = subset_indices(wnids, net.classes, what=f"{name} {root}")
    subset = torch.tensor(indices, dtype=torch.long, device=device)
    dataset = LabelledImages(folder_samples(root, {w: i for i, w in enumerate(wnids)}, what=f"{name} {root}",
                                            max_per_class=config["max_images_per_class"]), transform)
    log(f"[{ctx.stage}] {len(dataset)} images, {len(wnids)} of the head's {net.num_classes} classes, device {device}")

    def step(images, targets, _indices):
        correct = net(images)[:, subset].argmax(dim=-1).eq(targets)
        return {"correct": correct.sum().reshape(1), "total": torch.tensor([correct.numel()])}

    counts = accumulate(shard_loader(dataset, config["batch_size"], config["num_workers"]), step,
                        {"correct": 1, "total": 1}, device=device, desc=ctx.stage)
    if not is_main():
        return {}
    metrics = {"top1": percent(counts["correct"][0], counts["total"][0])}
    extra = common_extra(net, sizes, device)
    extra.update({"reported": "top1", "num_images": len(dataset), "num_classes": len(wnids),
                  "scoring": "argmax over the logits of the dataset's classes only (official eval.py)"})
    intervals, baselines = accuracy_evidence(metrics, dataset.labels.numpy(), len(wnids))
    write_robustness_metrics(ctx, dataset=name.lower(), metrics=metrics, extra=extra, head_meta=net.head.meta,
                             intervals=intervals, baselines=baselines)
    return metrics
