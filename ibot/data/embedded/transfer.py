"""What the embedded transfer-learning sets share: their classes, splits and pictures.

CIFAR-10/100 (:mod:`.cifar`), iNaturalist 2018/2019 (:mod:`.inat`), Flowers-102 (:mod:`.flowers`) and
Stanford Cars (:mod:`.cars`) each hold ``transfer_classes`` classes with ``transfer_train_per_class``
train and ``transfer_val_per_class`` val/test images. Class ``k`` is drawn as ``CLASS_POOL[k]`` (shape,
texture, hue) in a less object-centric framing than ImageNet (smaller objects, more clutter), seeded
by (seed, set, split, class, index) like every embedded image.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ibot.data.embedded.base import EmbeddedSizes
from ibot.data.embedded.classes import CLASS_POOL, ClassSpec
from ibot.data.embedded.render import Layers, object_layers, seeded_rng

__all__ = ["TRANSFER_FIELDS", "transfer_classes", "transfer_splits", "transfer_layers", "save_mat"]

#: The EmbeddedSizes fields every transfer set depends on (CIFAR ignores ``transfer_size``: 32 px by format).
TRANSFER_FIELDS: tuple[str, ...] = ("transfer_classes", "transfer_train_per_class", "transfer_val_per_class",
                                    "transfer_size")


def transfer_classes(sizes: EmbeddedSizes) -> list[ClassSpec]:
    """The classes of every transfer set, label order."""
    return list(CLASS_POOL[: sizes.transfer_classes])


def transfer_splits(sizes: EmbeddedSizes) -> tuple[tuple[str, int], ...]:
    """``(split, images per class)``: ``train`` and ``val`` (the sets' test split)."""
    return ("train", sizes.transfer_train_per_class), ("val", sizes.transfer_val_per_class)


def transfer_layers(seed: int, dataset: str, split: str, label: int, index: int, size: int) -> Layers:
    """Image ``index`` of class ``label`` in ``split`` of transfer set ``dataset`` (with its object mask)."""
    spec = CLASS_POOL[label]
    rng = seeded_rng(seed, dataset, split, spec.wnid, index)
    return object_layers(rng, spec, size, (0.45, 0.85), (1, 3), background_contrast=0.8)


#: MATLAB v5 header text (116 bytes): scipy writes the creation time there; a fixed text keeps the bytes seeded.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by ibot.data.embedded".ljust(116, b" ")


def save_mat(path: Path, variables: dict[str, Any]) -> None:
    """``scipy.io.savemat`` (MATLAB v5, as the releases) with a fixed header text: reproducible bytes."""
    from scipy import io as scio

    buffer = io.BytesIO()
    scio.savemat(buffer, variables)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_MAT_HEADER + buffer.getvalue()[len(_MAT_HEADER):])
