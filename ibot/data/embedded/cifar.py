"""Embedded CIFAR-10 and CIFAR-100 in the python-pickle release format torchvision reads.

- ``cifar10/cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (the train images split over
  five batches), ``test_batch``, ``batches.meta`` (``label_names``), ``readme.html``;
- ``cifar100/cifar-100-python/``: ``train``, ``test`` (``fine_labels`` + ``coarse_labels``), ``meta``
  (``fine_label_names``, ``coarse_label_names``).

Each batch is a pickled dict (protocol 2, as the release) with ``data``: uint8 ``[N, 3072]`` rows of
channel-major 32x32 RGB, the labels, ``filenames`` and ``batch_label``. Images are 32 px (the format's
size); the class names are the first real ones.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.render import seeded_rng, write_text
from ibot.data.embedded.transfer import transfer_classes, transfer_layers, transfer_splits

__all__ = ["CIFAR10_BUILDER", "CIFAR100_BUILDER", "CIFAR10_NAMES", "CIFAR100_NAMES", "CIFAR_SIZE"]

CIFAR_SIZE = 32  # the pickles hold 3 x 32 x 32 images
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: (fine name, coarse index): the first ten fine classes of the release and their super-classes.
CIFAR100_NAMES = (("apple", 4), ("aquarium_fish", 1), ("baby", 14), ("bear", 8), ("beaver", 0), ("bed", 6),
                  ("bee", 7), ("beetle", 7), ("bicycle", 18), ("bottle", 3))
CIFAR100_COARSE = ("aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
                   "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
                   "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
                   "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
                   "vehicles_1", "vehicles_2")


def _cifar_pixels(seed: int, dataset: str, split: str, label: int, index: int) -> np.ndarray:
    """One image as a CIFAR row: channel-major uint8 [3072]."""
    image = transfer_layers(seed, dataset, split, label, index, CIFAR_SIZE).image
    return np.ascontiguousarray(image.transpose(2, 0, 1)).reshape(-1)


def _samples(seed: int, sizes: EmbeddedSizes, dataset: str, run: Mapper) -> dict[str, dict[str, Any]]:
    """Per split: rows, labels and file names, in a seeded shuffled order (the release is not sorted)."""
    out = {}
    for split, count in transfer_splits(sizes):
        keys = [(label, i) for label in range(len(transfer_classes(sizes))) for i in range(count)]
        order = seeded_rng(seed, dataset, split, "order").permutation(len(keys))
        keys = [keys[j] for j in order]
        rows = list(run(_cifar_pixels, [(seed, dataset, split, label, i) for label, i in keys]))
        names = [f"embedded_{dataset}_{split}_{label}_{i}.png" for label, i in keys]
        out[split] = {"data": np.stack(rows).astype(np.uint8), "labels": [label for label, _ in keys],
                      "filenames": names}
    return out


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _readme(path: Path, dataset: str) -> None:
    write_text(path, f"Embedded {dataset} written by ibot.data.embedded in the release's python-pickle format; "
                     "NOT the real dataset (Krizhevsky, 2009).\n")


def _build_cifar10(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    folder = root / "cifar-10-batches-py"
    splits = _samples(seed, sizes, "cifar10", run)
    train = splits["train"]
    for b, part in enumerate(np.array_split(np.arange(len(train["labels"])), 5), start=1):
        _dump(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "data": train["data"][part],
                                           "labels": [train["labels"][j] for j in part],
                                           "filenames": [train["filenames"][j] for j in part]})
    test = splits["val"]
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", **test})
    _dump(folder / "batches.meta", {"label_names": list(CIFAR10_NAMES[: sizes.transfer_classes]),
                                    "num_cases_per_batch": int(np.ceil(len(train["labels"]) / 5)),
                                    "num_vis": 3 * CIFAR_SIZE * CIFAR_SIZE})
    _readme(folder / "readme.html", "CIFAR-10")


def _build_cifar100(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    folder = root / "cifar-100-python"
    names = CIFAR100_NAMES[: sizes.transfer_classes]
    splits = _samples(seed, sizes, "cifar100", run)
    for split, file in (("train", "train"), ("val", "test")):
        part = splits[split]
        batch_label = f"{'training' if split == 'train' else 'testing'} batch 1 of 1"
        _dump(folder / file, {"batch_label": batch_label, "data": part["data"], "fine_labels": part["labels"],
                              "coarse_labels": [names[k][1] for k in part["labels"]], "filenames": part["filenames"]})
    _dump(folder / "meta", {"fine_label_names": [name for name, _ in names],
                            "coarse_label_names": list(CIFAR100_COARSE)})
    _readme(folder / "README.txt", "CIFAR-100")


_FIELDS = ("transfer_classes", "transfer_train_per_class", "transfer_val_per_class")
CIFAR10_BUILDER = SetBuilder(_FIELDS, _build_cifar10)
CIFAR100_BUILDER = SetBuilder(_FIELDS, _build_cifar100)
