"""Embedded Stanford Cars in the all-images release layout: ``stanford_cars/car_ims/<6 digits>.jpg``
and ``cars_annos.mat`` (MATLAB v5): ``annotations``, a 1 x N struct array with ``relative_im_path``
(``car_ims/000001.jpg``), ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2`` (the object's tight box,
1-based inclusive pixels), ``class`` (1-based) and ``test`` (1 for the test split), plus
``class_names`` (1 x K cell).

Image numbers follow a seeded shuffle of train and test images (the release interleaves them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.render import save_jpeg, seeded_rng, tight_box
from ibot.data.embedded.transfer import TRANSFER_FIELDS, save_mat, transfer_classes, transfer_layers, transfer_splits

__all__ = ["BUILDER", "ANNOTATION_FIELDS"]

#: Fields of one ``annotations`` record, in the release's order (the official reader indexes them).
ANNOTATION_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def _cars_file(root: str, seed: int, sizes: EmbeddedSizes, number: int, split: str, label: int,
               index: int) -> tuple[int, int, int, int]:
    """Write one image; its box ``(x1, y1, x2, y2)``, 1-based inclusive."""
    layers = transfer_layers(seed, "stanford_cars", split, label, index, sizes.transfer_size)
    save_jpeg(Path(root) / "car_ims" / f"{number:06d}.jpg", layers.image)
    y0, y1, x0, x1 = tight_box(layers.mask)
    return x0 + 1, y0 + 1, x1, y1


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    classes = transfer_classes(sizes)
    keys = [(split, label, i) for split, count in transfer_splits(sizes)
            for label in range(len(classes)) for i in range(count)]
    numbers = seeded_rng(seed, "stanford_cars", "numbers").permutation(len(keys)) + 1
    boxes = list(run(_cars_file, [(str(root), seed, sizes, int(n), *key) for n, key in zip(numbers, keys)]))
    records = sorted(zip(numbers, keys, boxes))
    annotations = np.empty((1, len(records)), dtype=[(name, object) for name in ANNOTATION_FIELDS])
    for j, (number, (split, label, _), box) in enumerate(records):
        annotations[0, j] = (np.array([f"car_ims/{number:06d}.jpg"]), *(np.array([[v]], dtype=np.uint16) for v in box),
                             np.array([[label + 1]], dtype=np.uint8), np.array([[int(split == "val")]], dtype=np.uint8))
    names = np.empty((1, len(classes)), dtype=object)
    for label, spec in enumerate(classes):
        names[0, label] = f"Embedded {spec.name.split()[0]} Coupe {2000 + label}"
    save_mat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})


BUILDER = SetBuilder(TRANSFER_FIELDS, _build)
