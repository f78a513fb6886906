"""ImageNet-A (Hendrycks et al., CVPR 2021): top-1 over its 200-class subset.

Layout ``<root>/<wnid>/*``. As in the official evaluation (hendrycks/natural-adv-examples
``eval.py``, copied by iBOT's ``analysis/natural_adv_examples/eval.py``) the 1000-way logits are
restricted to the classes present as folders (``output[:, indices_in_1k]``) and the prediction
is the argmax over that subset. The subset is found through the linear head's ``classes`` (wnid
list), so it works for any head class order; a wnid unknown to the head is an error. Transform:
the head's eval ``resize``/``crop`` (256/224), bicubic, ImageNet normalisation.

ImageNet-R (:mod:`downstream.robustness.imagenet_r`) uses the same mechanism.

Metric: ``top1`` (percent).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from downstream.features import log
from downstream.cli import stage_main
from downstream.robustness.common import (LabelledImages, RobustnessError, accumulate, class_folders, common_extra,
                                          folder_samples, percent, prepare, shard_loader, write_robustness_metrics)
from ibot.distributed import barrier, init_distributed, is_main
from ibot.stages import stage_defaults

__all__ = ["DEFAULTS", "subset_indices", "run_class_subset", "run", "main"]

#: Official protocol: workflow/schemas/robustness.schema.yaml (imagenet_a), the one source.
DEFAULTS: dict[str, Any] = stage_defaults("imagenet_a")


def subset_indices(folder_wnids: Sequence[str], head_classes: Sequence[str], *, what: str) -> list[int]:
    """Head output index of every folder wnid (folder order = label order); unknown wnids are an error."""
    index = {wnid: i for i, wnid in enumerate(head_classes)}
    unknown = [w for w in folder_wnids if w not in index]
    if unknown:
        raise RobustnessError(f"{what}: class folders {unknown[:10]}{' ...' if len(unknown) > 10 else ''} are not "
                              f"classes of the linear head ({len(head_classes)} classes, e.g. "
                              f"{list(head_classes[:3])}); the head must be trained on the matching ImageNet classes")
    return [index[w] for w in folder_wnids]


def run_class_subset(stage: str, dataset_name: str, config: Mapping[str, Any], model_spec: Mapping[str, Any],
                     checkpoint: str | None, checkpoint_key: str | None, data: str, out: str, run: str, model: str,
                     seed: int, head: str) -> dict[str, float]:
    """Top-1 with logits restricted to the dataset's classes (ImageNet-A, ImageNet-R)."""
    init_distributed()
    started = time.time()
    root = Path(data)
    wnids = class_folders(root, what=f"{dataset_name} {root}")
    net, transform, sizes, device = prepare(config, model_spec, checkpoint, checkpoint_key, head, seed)
    indices = subset_indices(wnids, net.classes, what=f"{dataset_name} {root}")
    subset = torch.tensor(indices, dtype=torch.long, device=device)
    dataset = LabelledImages(folder_samples(root, {w: i for i, w in enumerate(wnids)}, what=f"{dataset_name} {root}",
                                            max_per_class=config["max_images_per_class"]), transform)
    log(f"[{stage}] {len(dataset)} images, {len(wnids)} of the head's {net.num_classes} classes, device {device}")

    def step(images, targets, _indices):
        correct = net(images)[:, subset].argmax(dim=-1).eq(targets)
        return {"correct": correct.sum().reshape(1), "total": torch.tensor([correct.numel()])}

    counts = accumulate(shard_loader(dataset, config["batch_size"], config["num_workers"]), step,
                        {"correct": 1, "total": 1}, device=device, desc=stage)
    metrics: dict[str, float] = {}
    if is_main():
        metrics = {"top1": percent(counts["correct"][0], counts["total"][0])}
        extra = common_extra(net, sizes, device)
        extra.update({"reported": "top1", "num_images": len(dataset), "num_classes": len(wnids),
                      "scoring": "argmax over the logits of the dataset's classes only (official eval.py)"})
        write_robustness_metrics(out, run=run, model=model, stage=stage, dataset=dataset_name.lower(),
                                 metrics=metrics, config=config, started=started, checkpoint=checkpoint, extra=extra,
                                 head_meta=net.head.meta)
    barrier()
    return metrics


def run(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
        checkpoint_key: str | None, data: str, out: str, run: str, model: str, seed: int,
        head: str) -> dict[str, float]:
    return run_class_subset("imagenet_a", "ImageNet-A", config, model_spec, checkpoint, checkpoint_key, data, out,
                            run, model, seed, head)


def main(argv: Sequence[str] | None = None) -> Any:
    return stage_main("imagenet_a", "downstream.robustness.imagenet_a:run", DEFAULTS, argv,
                     description="ImageNet-A top-1 of backbone + linear head (logits restricted to its 200 classes).")


if __name__ == "__main__":
    main()
