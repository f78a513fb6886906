"""The dataset kinds of the reproduction, in one table.

Why: the config keys (``data.<kind>``), the layout checks (:mod:`ibot.data.layouts`), the embedded
generator (:mod:`ibot.data.embedded`) and the workflow all speak of the same datasets; they read the
names from :data:`DATASET_KINDS` instead of keeping their own lists. Modules that need one entry per
kind call :func:`check_coverage` at import time, so adding a kind here without its layout check or
its embedded builder fails on import with a message naming the module and the kinds.

This module imports nothing heavy (the Snakefile reads it at parse time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["DatasetKind", "DATASET_KINDS", "EMBEDDED_KINDS", "PRETRAIN_DATA", "check_coverage"]


@dataclass(frozen=True)
class DatasetKind:
    """One dataset kind: its name (= the ``data.<name>`` config key), title and on-disk layout."""

    name: str
    title: str  # human name, e.g. "ImageNet-C"
    description: str  # one line: the on-disk layout the loaders expect
    embedded: bool  # whether ibot.data.embedded generates it
    embedded_root: str | None = None  # folder under the embedded root (None when not generated)

    def __post_init__(self) -> None:
        if self.embedded != (self.embedded_root is not None):
            raise ValueError(f"dataset kind {self.name!r}: embedded_root must be set iff embedded is true")

    @property
    def config_key(self) -> str:
        """The config key holding this dataset's root path."""
        return f"data.{self.name}"


_KINDS: tuple[DatasetKind, ...] = (
    DatasetKind("imagenet", "ImageNet", "ImageFolder root with train/<wnid>/ and val/<wnid>/", True, "imagenet"),
    DatasetKind("imagenet22k", "ImageNet-22K", "ImageNet-22K (fall11 whole) root: <wnid>/ class folders of the "
                "21,841 synsets, all used for pretraining (no split)", False),
    DatasetKind("coco", "COCO 2017", "COCO 2017 root: train2017/*.jpg, val2017/*.jpg and "
                "annotations/instances_{train,val}2017.json", True, "coco"),
    DatasetKind("ade20k", "ADE20K", "ADEChallengeData2016 root: images/{training,validation}/*.jpg and "
                "annotations/{training,validation}/*.png", True, "ADEChallengeData2016"),
    DatasetKind("imagenet_c", "ImageNet-C", "ImageNet-C root: <corruption>/<severity 1-5>/<wnid>/ "
                "(e.g. gaussian_noise/1/n01440764/)", True, "imagenet_c"),
    DatasetKind("imagenet_a", "ImageNet-A", "ImageNet-A root: <wnid>/ class folders (e.g. n01498041/)",
                True, "imagenet_a"),
    DatasetKind("imagenet_r", "ImageNet-R", "ImageNet-R root: <wnid>/ class folders (e.g. n01443537/)", False),
    DatasetKind("imagenet_9", "ImageNet-9 (backgrounds challenge)", "backgrounds-challenge root: "
                "<variant>/val/<k>_<class>/ (variant: original, only_fg, ...) + in_to_in9.json", True, "imagenet_9"),
    # transfer learning (Tab. 7): the layouts the official evaluation/eval_cls.py reads
    DatasetKind("cifar10", "CIFAR-10", "torchvision CIFAR-10 root: cifar-10-batches-py/ with the python pickles "
                "data_batch_1..5, test_batch and batches.meta", True, "cifar10"),
    DatasetKind("cifar100", "CIFAR-100", "torchvision CIFAR-100 root: cifar-100-python/ with the python pickles "
                "train, test and meta", True, "cifar100"),
    DatasetKind("inat18", "iNaturalist 2018", "iNat 2018 root: train2018.json and val2018.json (images, annotations, "
                "categories), categories.json (optional) and the train_val2018/<super>/<category id>/*.jpg they name",
                True, "inat2018"),
    DatasetKind("inat19", "iNaturalist 2019", "iNat 2019 root: train2019.json and val2019.json (images, annotations, "
                "categories), categories.json (optional) and the train_val2019/<super>/<category id>/*.jpg they name",
                True, "inat2019"),
    DatasetKind("flowers", "Oxford Flowers-102", "Flowers-102 root: jpg/image_<n>.jpg, imagelabels.mat (labels) and "
                "setid.mat (trnid, valid, tstid)", True, "flowers102"),
    DatasetKind("cars", "Stanford Cars", "Stanford Cars root: cars_annos.mat (annotations: relative_im_path, bbox, "
                "class, test) and the car_ims/*.jpg it names", True, "stanford_cars"),
    # video object segmentation (Tab.16): the layout evaluation/eval_video_segmentation.py reads
    DatasetKind("davis", "DAVIS-2017", "DAVIS-2017 root: ImageSets/2017/val.txt (video names), "
                "JPEGImages/480p/<video>/%05d.jpg and Annotations/480p/<video>/%05d.png (palette PNGs, pixel = "
                "object id)", True, "davis"),
    # image retrieval (Tab.16): the layout evaluation/eval_image_retrieval.py reads
    DatasetKind("revisitop", "Revisited Oxford 5k / Paris 6k", "revisitop datasets root: roxford5k/ and rparis6k/, "
                "each with gnd_<set>.pkl (imlist, qimlist, gnd: per query bbx, easy, hard, junk) and jpg/<name>.jpg",
                True, "revisitop"),
)

#: Every dataset kind by name, in a fixed order (read-only).
DATASET_KINDS: Mapping[str, DatasetKind] = MappingProxyType({kind.name: kind for kind in _KINDS})
#: Pretraining data of a model (``models.<m>.pretrain_data``, the paper's ``pretrain_data`` column) ->
#: (dataset kind, folder of the training images under its root; "" = the root itself).
PRETRAIN_DATA: Mapping[str, tuple[str, str]] = MappingProxyType({
    "IN-1K": ("imagenet", "train"),
    "IN-22K": ("imagenet22k", ""),
})
#: The kinds the embedded generator builds, in ``DATASET_KINDS`` order.
EMBEDDED_KINDS: tuple[str, ...] = tuple(kind.name for kind in _KINDS if kind.embedded)


def check_coverage(owner: str, provided: Iterable[str], needed: Iterable[str]) -> None:
    """Raise RuntimeError unless ``provided`` (the kinds ``owner`` handles) equals ``needed``.

    Called at import time by the modules keyed by dataset kind, so a table and its users cannot drift.
    """
    provided, needed = set(provided), set(needed)
    if provided == needed:
        return
    problems = []
    if needed - provided:
        problems.append(f"missing {sorted(needed - provided)}")
    if provided - needed:
        problems.append(f"unknown {sorted(provided - needed)}")
    raise RuntimeError(f"{owner} does not match ibot.data.kinds.DATASET_KINDS: {', '.join(problems)}")
