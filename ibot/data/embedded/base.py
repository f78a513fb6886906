"""What the dataset modules share with the build driver: sizes, the task mapper, a set's builder.

Every dataset module (``imagenet``, ``coco``, ...) exposes ``BUILDER``: the :class:`EmbeddedSizes`
fields its output depends on (recorded in its manifest) and the function writing it into a root.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ibot.data.embedded.classes import CLASS_POOL

__all__ = ["EmbeddedSizes", "Mapper", "SetBuilder"]


@dataclass(frozen=True)
class EmbeddedSizes:
    """Counts and resolutions of the embedded sets (overridable from the workflow config)."""

    classes: int = 10
    train_per_class: int = 100
    val_per_class: int = 20
    image_size: int = 64
    c_per_class: int = 5
    a_classes: int = 5
    a_per_class: int = 10
    coco_train: int = 60
    coco_val: int = 20
    coco_size: int = 128
    ade_train: int = 60
    ade_val: int = 20
    ade_size: int = 128
    # transfer sets (CIFAR-10/100, iNat 2018/19, Flowers-102, Stanford Cars); CIFAR is 32 px by format
    transfer_classes: int = 10
    transfer_train_per_class: int = 4
    transfer_val_per_class: int = 2
    transfer_size: int = 32
    # DAVIS-2017 video object segmentation: videos (alternately 1 and 2 objects), frames each, frame width (px)
    davis_videos: int = 3
    davis_frames: int = 8
    davis_size: int = 160
    # Revisited Oxford / Paris (image retrieval, Tab.16): per set landmarks x database images, distractors, queries
    revisitop_landmarks: int = 5
    revisitop_per_landmark: int = 8
    revisitop_distractors: int = 30
    revisitop_queries: int = 8
    revisitop_size: int = 96

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EmbeddedSizes.{field.name} must be a positive int, got {value!r}")
        for name in ("classes", "transfer_classes"):
            if getattr(self, name) > len(CLASS_POOL):
                raise ValueError(f"EmbeddedSizes.{name} must be <= {len(CLASS_POOL)}, got {getattr(self, name)}")
        if self.c_per_class > self.val_per_class:
            raise ValueError("EmbeddedSizes.c_per_class must be <= val_per_class")
        if self.a_classes > self.classes:
            raise ValueError("EmbeddedSizes.a_classes must be <= classes")
        if self.revisitop_landmarks > len(CLASS_POOL) or self.revisitop_per_landmark < 2 or self.revisitop_size < 32:
            raise ValueError(f"EmbeddedSizes: revisitop_landmarks must be <= {len(CLASS_POOL)}, revisitop_per_landmark "
                             ">= 2 (an easy and a hard view) and revisitop_size >= 32")
        for name in ("image_size", "coco_size", "ade_size"):
            if getattr(self, name) < 32:
                raise ValueError(f"EmbeddedSizes.{name} must be >= 32 (ImageNet-C needs it)")


#: Ordered map of a task function over argument tuples (in-process or on a pool): ``run(fn, tasks)``.
#: Task functions are module-level (picklable) and seed every image from its own keys, so the bytes
#: do not depend on the mapper.
Mapper = Callable[[Callable[..., Any], Sequence[tuple[Any, ...]]], Iterable[Any]]


@dataclass(frozen=True)
class SetBuilder:
    """How one embedded set is built: its size fields and ``build(root, seed, sizes, run)``."""

    fields: tuple[str, ...]
    build: Callable[[Path, int, EmbeddedSizes, Mapper], None]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fields) - {f.name for f in dataclasses.fields(EmbeddedSizes)})
        if unknown:
            raise ValueError(f"SetBuilder.fields: {unknown} are not EmbeddedSizes fields")
