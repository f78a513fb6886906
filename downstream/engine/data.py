"""Data of the classification evaluations: the official transforms, ImageFolder datasets that return
the sample index (features gathered from a padding ``DistributedSampler`` are de-duplicated by it),
and DDP-aware loaders whose order depends only on (seed, epoch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms

from ibot.distributed import rank, world_size

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "eval_transform", "linear_train_transform",
           "finetune_train_transform", "IndexedImageFolder", "Indexed", "image_folder", "train_val_folders",
           "make_loader", "train_sampler", "dataset_label"]

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bicubic": transforms.InterpolationMode.BICUBIC,
                  "bilinear": transforms.InterpolationMode.BILINEAR,
                  "nearest": transforms.InterpolationMode.NEAREST}


# -- transforms --------------------------------------------------------------------------------
def eval_transform(resize: int, crop: int, interpolation: str = "bicubic") -> transforms.Compose:
    """Official evaluation transform: resize shorter side, centre crop, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(int(resize), interpolation=INTERPOLATIONS[interpolation]),
        transforms.CenterCrop(int(crop)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def linear_train_transform(crop: int, interpolation: str = "bilinear") -> transforms.Compose:
    """Official linear-probe training transform (eval_linear.py): RandomResizedCrop + flip.

    The official script calls ``RandomResizedCrop(224)`` with torchvision's default
    interpolation (bilinear); the key is configurable (``train_interpolation``).
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(int(crop), interpolation=INTERPOLATIONS[interpolation]),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def finetune_train_transform(config: Mapping[str, Any]):
    """timm ``create_transform(is_training=True)`` with the official fine-tuning arguments (RandAugment,
    colour jitter, random erasing); inputs of at most 32 px use ``RandomCrop(padding=4)``, as the
    official ``build_transform``."""
    from timm.data import create_transform
    transform = create_transform(
        input_size=int(config["crop"]), is_training=True, color_jitter=float(config["color_jitter"]),
        auto_augment=config["auto_augment"], interpolation=config["train_interpolation"],
        re_prob=float(config["re_prob"]), re_mode=config["re_mode"], re_count=int(config["re_count"]),
        mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if int(config["crop"]) <= 32:
        transform.transforms[0] = transforms.RandomCrop(int(config["crop"]), padding=4)
    return transform


# -- datasets and loaders ----------------------------------------------------------------------
class IndexedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` whose items are ``(image, label, index)``."""

    def __getitem__(self, index: int):  # type: ignore[override]
        image, label = super().__getitem__(index)
        return image, label, index


class Indexed(Dataset):
    """Any ``(image, label)`` dataset as ``(image, label, index)`` items."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = self.dataset[index]
        return image, label, index


def image_folder(root: str | Path, split: str, transform: Callable | None) -> IndexedImageFolder:
    """``<root>/<split>`` as an indexed ImageFolder, with a clear error when the layout is wrong."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset {root}: no '{split}/' folder (expected the ImageNet layout "
                                f"<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG)")
    return IndexedImageFolder(str(folder), transform=transform)


def train_val_folders(root: str | Path, train_transform: Callable | None, val_transform: Callable | None
                      ) -> tuple[IndexedImageFolder, IndexedImageFolder]:
    """``<root>/train`` and ``<root>/val``, which must hold the same class folders."""
    train, val = image_folder(root, "train", train_transform), image_folder(root, "val", val_transform)
    if train.classes != val.classes:
        raise ValueError(f"dataset {root}: train/ and val/ have different class folders")
    return train, val


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                num_workers: int = 0) -> DataLoader:
    """Loader over this process's shard: ``DistributedSampler`` (which pads) when ``world_size() > 1``.

    With one process and ``shuffle`` it still uses a (1-replica) DistributedSampler so the order of
    epoch ``e`` depends only on ``(seed, e)`` (call ``loader.sampler.set_epoch(e)``): a resumed run
    sees the same data order as an uninterrupted one.
    """
    sampler = None
    if world_size() > 1 or shuffle:
        sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                                     drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


def train_sampler(dataset: Dataset, repeated_aug: bool, seed: int):
    """The training sampler of the DeiT recipe (eval_cls.py:559-566 transfer, semi_supervised/eval_cls.py:641-648):
    repeated augmentation (timm ``RepeatAugSampler`` = DeiT ``RASampler``: each image 3 times per epoch,
    ``len // 256 x 256`` samples per epoch over all processes; order seeded by the epoch only), or a
    shuffling ``DistributedSampler`` seeded by ``seed``."""
    from timm.data.distributed_sampler import RepeatAugSampler

    if repeated_aug:
        return RepeatAugSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True)
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def dataset_label(data: str | Path, num_classes: int) -> str:
    """``imagenet-1k`` for a 1000-class ImageNet folder, else the data folder's name."""
    return "imagenet-1k" if num_classes == 1000 else Path(data).resolve().name
