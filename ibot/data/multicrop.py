"""Multi-crop augmentation and the masked multi-crop pretraining dataset.

``DataAugmentationIBOT`` is the official ``DataAugmentationiBOT`` (bytedance/ibot ``main_ibot.py``)
with crop sizes as arguments. ``MultiCropMaskedDataset`` plays the role of the official
``ImageFolderMask``: it returns the crops, the label and one patch mask per global crop. Unlike the
official loader, every sample's randomness is a function of (seed, epoch, index) only, so a resumed
run (or any worker layout) replays exactly the same crops and masks.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ibot.data.batched_augment import AUGMENTATIONS, FastMultiCrop, PendingViews, PhotometricParams, ibot_view_recipes
from ibot.data.masking import MaskGenerator

__all__ = ["GaussianBlur", "Solarization", "DataAugmentationIBOT", "MultiCropMaskedDataset", "PendingViews",
           "collate_multicrop"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with radius ~ U(radius_min, radius_max), applied with probability ``p``."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:  # official: apply when random() <= p
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """PIL solarization (invert pixels >= 128), applied with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationIBOT:
    """DINO/iBOT multi-crop views of one PIL image: ``global_crops_number`` global crops (the first
    always blurred; the others blurred with p=0.1 and solarized with p=0.2) followed by
    ``local_crops_number`` local crops (blur p=0.5). All share flip, colour jitter (p=0.8), grayscale
    (p=0.2) and ImageNet normalisation; crops are bicubic ``RandomResizedCrop``s."""

    def __init__(self, global_crops_scale: tuple[float, float] = (0.14, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), global_crops_number: int = 2,
                 local_crops_number: int = 0, global_crops_size: int = 224, local_crops_size: int = 96) -> None:
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = transforms.InterpolationMode.BICUBIC

        def crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)

        self.global_crops_number = global_crops_number
        self.local_crops_number = local_crops_number
        self.global_transfo1 = transforms.Compose([
            crop(global_crops_size, global_crops_scale), flip_and_color_jitter, GaussianBlur(1.0), normalize])
        self.global_transfo2 = transforms.Compose([
            crop(global_crops_size, global_crops_scale), flip_and_color_jitter, GaussianBlur(0.1),
            Solarization(0.2), normalize])
        self.local_transfo = transforms.Compose([
            crop(local_crops_size, local_crops_scale), flip_and_color_jitter, GaussianBlur(p=0.5), normalize])

    def __call__(self, image: Image.Image) -> list[Tensor]:
        crops = [self.global_transfo1(image)]
        crops += [self.global_transfo2(image) for _ in range(self.global_crops_number - 1)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


class _SeededGlobalRNGs:
    """Context that seeds Python's ``random`` and torch's default CPU generator (the RNGs torchvision
    v1 transforms and the PIL ops above draw from) and restores their previous states on exit, so the
    caller's (e.g. the training loop's, when ``num_workers=0``) random streams are left untouched."""

    def __init__(self, python_seed: int, torch_seed: int) -> None:
        self.python_seed = python_seed
        self.torch_seed = torch_seed

    def __enter__(self) -> None:
        self._python_state = random.getstate()
        self._torch_state = torch.get_rng_state()
        random.seed(self.python_seed)
        torch.default_generator.manual_seed(self.torch_seed)  # CPU only: CUDA generators stay as they are

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self._python_state)
        torch.set_rng_state(self._torch_state)


class MultiCropMaskedDataset(Dataset):
    """(crops, label, masks) samples for iBOT pretraining.

    ``crops``: list of [3, H, W] tensors (global crops first); ``masks``: one bool [h, w] tensor per
    global crop (h, w = crop size // ``patch_size``; all False when the ratio is 0). ``source`` is an
    image-folder root (``torchvision.datasets.ImageFolder``) or any dataset of (PIL RGB image, label).

    ``augmentation`` (same random draws and distribution in all three, see
    ``ibot.data.batched_augment``): ``official``, the PIL transforms of the official code; ``fast``
    and ``gpu``: ``crops`` is a :class:`PendingViews` of uint8 views, photometric ops applied
    (``fast``: OpenCV in the worker) or left to the training device (``gpu``); the trainer calls
    ``PendingViews.finish`` on its device (normalisation, and for ``gpu`` the photometric ops).

    Randomness per sample is derived from ``(seed, epoch, index)``: augmentations reseed the global
    RNGs for the duration of ``__getitem__``, masks use their own numpy generator. ``set_epoch`` must be
    called before each epoch's DataLoader iterator is created (workers copy the dataset then; with
    ``persistent_workers=True`` they would keep the old epoch).
    """

    def __init__(self, source: str | os.PathLike | Dataset, *, global_crops_scale: tuple[float, float] = (0.14, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), global_crops_number: int = 2,
                 local_crops_number: int = 0, global_crops_size: int = 224, local_crops_size: int = 96,
                 patch_size: int = 16, pred_ratio: float | Sequence[float] = 0.3,
                 pred_ratio_var: float | Sequence[float] = 0.0,
                 pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3), pred_shape: str = "block",
                 pred_start_epoch: int = 0, seed: int = 0, augmentation: str = "official") -> None:
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"pretrain.augmentation: {augmentation!r}; expected one of {', '.join(AUGMENTATIONS)}")
        self.dataset: Dataset = source if isinstance(source, Dataset) else datasets.ImageFolder(os.fspath(source))
        self.augmentation = augmentation
        self.transform: Callable[[Image.Image], list[Tensor]] = DataAugmentationIBOT(
            global_crops_scale, local_crops_scale, global_crops_number, local_crops_number,
            global_crops_size, local_crops_size)
        self.fast_transform = FastMultiCrop(ibot_view_recipes(
            global_crops_scale, local_crops_scale, global_crops_number, local_crops_number,
            global_crops_size, local_crops_size), photometric_on_cpu=augmentation == "fast")
        self.mask_generator = MaskGenerator(patch_size, pred_ratio, pred_ratio_var, pred_aspect_ratio, pred_shape,
                                            pred_start_epoch)
        self.global_crops_number = global_crops_number
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.mask_generator.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[list[Tensor] | PendingViews, int, list[Tensor]]:
        augment_seq, mask_seq = np.random.SeedSequence([self.seed, self.epoch, index]).spawn(2)
        python_seed, torch_seed = (int(s) for s in augment_seq.generate_state(2))
        samples = getattr(self.dataset, "samples", None)
        where = samples[index][0] if samples else f"sample {index}"
        try:
            if self.augmentation == "official" or not samples:
                image, label = self.dataset[index]
            else:  # the file itself: FastMultiCrop decodes JPEGs at reduced size when the crops allow
                image, label = samples[index]
            with _SeededGlobalRNGs(python_seed, torch_seed):
                crops = self.transform(image) if self.augmentation == "official" else self.fast_transform(image)
        except OSError as error:  # PIL: truncated or unidentifiable file; name it, not just the cause
            raise OSError(f"unreadable image {where}: {error}") from error
        sizes = [c.shape[-2:] for c in (crops.crops if isinstance(crops, PendingViews) else crops)]
        mask_rng = np.random.default_rng(mask_seq)
        masks = [torch.from_numpy(self.mask_generator.mask_for_crop(h, w, mask_rng))
                 for h, w in sizes[: self.global_crops_number]]
        return crops, label, masks


def collate_multicrop(batch: Sequence[tuple[list[Tensor] | PendingViews, int, list[Tensor]]], finish: bool = False
                      ) -> tuple[list[Tensor] | PendingViews, Tensor, list[Tensor]]:
    """Stack samples per crop index: ([B, 3, H, W] per crop, labels [B], [B, h, w] bool per global crop).

    :class:`PendingViews` samples give a :class:`PendingViews` of [B, 3, H, W] uint8 crops per view, or
    with ``finish`` the float views on the CPU (batched per view size)."""
    crops, labels, masks = zip(*batch)
    stacked_masks = [torch.stack(views) for views in zip(*masks)]
    if isinstance(crops[0], PendingViews):
        # [B, V, ...] per field -> view-major rows, the order of torch.cat of the stacked views
        params = PhotometricParams(*(torch.stack(field).transpose(0, 1).flatten(0, 1)
                                     for field in zip(*(c.params for c in crops))))
        views = PendingViews([torch.stack(v) for v in zip(*(c.crops for c in crops))], params,
                             crops[0].photometric_done)
        return (views.finish() if finish else views), torch.as_tensor(labels), stacked_masks
    return [torch.stack(views) for views in zip(*crops)], torch.as_tensor(labels), stacked_masks
