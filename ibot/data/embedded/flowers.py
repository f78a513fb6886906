"""Embedded Oxford Flowers-102 in the release layout: ``flowers102/jpg/image_<5 digits>.jpg``,
``imagelabels.mat`` (``labels``: 1 x N, 1-based class per image number) and ``setid.mat`` (``trnid``,
``valid``, ``tstid``: 1-based image numbers), MATLAB v5 files as released.

Per class, the train images are split between ``trnid`` and ``valid`` (the official reader trains on
both), the val images form ``tstid``. Image numbers are assigned in a seeded shuffled order (the
release does not sort them by class).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.render import save_jpeg, seeded_rng
from ibot.data.embedded.transfer import TRANSFER_FIELDS, save_mat, transfer_classes, transfer_layers, transfer_splits

__all__ = ["BUILDER", "image_name"]


def image_name(number: int) -> str:
    """Release file name of 1-based image ``number``."""
    return f"image_{number:05d}.jpg"


def _flowers_file(root: str, seed: int, sizes: EmbeddedSizes, number: int, split: str, label: int, index: int) -> None:
    image = transfer_layers(seed, "flowers102", split, label, index, sizes.transfer_size).image
    save_jpeg(Path(root) / "jpg" / image_name(number), image)


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    keys = [(split, label, i) for split, count in transfer_splits(sizes)
            for label in range(len(transfer_classes(sizes))) for i in range(count)]
    numbers = seeded_rng(seed, "flowers102", "numbers").permutation(len(keys)) + 1
    list(run(_flowers_file, [(str(root), seed, sizes, int(n), *key) for n, key in zip(numbers, keys)]))
    labels = np.zeros((1, len(keys)), dtype=np.uint8)
    setid: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    half = (sizes.transfer_train_per_class + 1) // 2
    for number, (split, label, i) in zip(numbers, keys):
        labels[0, number - 1] = label + 1
        setid["tstid" if split == "val" else "trnid" if i < half else "valid"].append(int(number))
    save_mat(root / "imagelabels.mat", {"labels": labels})
    save_mat(root / "setid.mat", {name: np.array([sorted(ids)], dtype=np.uint16) for name, ids in setid.items()})


BUILDER = SetBuilder(TRANSFER_FIELDS, _build)
