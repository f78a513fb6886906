"""Embedded ImageNet-C: ``imagenet_c/<corruption>/<1-5>/<wnid>/ILSVRC2012_val_*.JPEG``.

The 19 corruptions of :mod:`ibot.data.corruptions` (15 benchmark + 4 extra) at severities 1-5 of
the first ``c_per_class`` val images of each class, re-rendered from the exact ``imagenet/val`` pixels.
"""

from __future__ import annotations

from pathlib import Path

from ibot.data.corruptions import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt
from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.imagenet import imagenet_classes, imagenet_layers, val_name
from ibot.data.embedded.render import save_jpeg, seeded_rng

__all__ = ["BUILDER"]


def _imagenet_c_files(root: str, seed: int, sizes: EmbeddedSizes, wnid: str, index: int, corruption: str) -> None:
    classes = imagenet_classes(sizes)
    spec = next(c for c in classes if c.wnid == wnid)
    name = val_name(classes, spec, index, sizes.val_per_class)
    clean = imagenet_layers(seed, "val", spec, index, sizes.image_size).image
    for severity in range(1, 6):
        rng = seeded_rng(seed, "imagenet_c", corruption, severity, wnid, index)
        save_jpeg(Path(root) / corruption / str(severity) / wnid / name, corrupt(clean, corruption, severity, rng))


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    tasks = [
        (str(root), seed, sizes, spec.wnid, i, corruption)
        for spec in imagenet_classes(sizes)
        for i in range(sizes.c_per_class)
        for corruption in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
    ]
    list(run(_imagenet_c_files, tasks))


BUILDER = SetBuilder(("classes", "val_per_class", "image_size", "c_per_class"), _build)
