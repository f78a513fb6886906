"""The official multi-crop views, computed fast: same random parameters, batched tensor operations.

The official pipeline (``ibot.data.multicrop.DataAugmentationIBOT``, i.e. bytedance/ibot
``main_ibot.py`` ``DataAugmentationiBOT``) runs about eight PIL operations per crop, one crop at a
time, with colour-space round trips and a float conversion per crop: ~30 ms per image with the
paper's 2x224 + 10x96 crops on one core. Here the work is split in two:

1. :func:`sample_view` draws every random parameter of a view with *the same torchvision samplers in
   the same order* as the official ``Compose`` (``RandomResizedCrop.get_params``, flip, ``RandomApply``
   of ``ColorJitter`` and its ``get_params``, grayscale, then the PIL blur and solarization draws),
   so under the same seeded RNGs both pipelines pick identical crops, flips, jitter orders and
   factors, blur radii and solarizations.
2. :class:`FastMultiCrop` decodes once (with JPEG DCT-domain downscaling when every crop is
   downscaled at least 2x anyway), crops and resizes uint8 tensors (antialiased bicubic, PIL's filter),
   and :func:`apply_photometric` applies flip, colour jitter, grayscale, blur and solarization to a
   whole batch of views at once with per-view parameters. It runs on any device: in the data
   workers (``augmentation: fast``) or on the GPU in the trainer (``augmentation: gpu``, the workers
   then only decode, crop and resize, and ship uint8 crops: 4x fewer bytes to pin and copy).

Not bitwise equal to PIL (floats instead of uint8 rounding after each operation; a true Gaussian
kernel where Pillow uses three box-blur passes of the same standard deviation; JPEG DCT scaling
instead of decoding at full size for crops that are downscaled anyway): the distribution is the same,
which ``tests/test_batched_augment.py`` checks per view and per operation against the PIL reference.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

__all__ = ["ViewRecipe", "ViewDraw", "PhotometricParams", "ibot_view_recipes", "sample_view", "draft_factor",
           "apply_photometric", "photometric_views", "photometric_uint8", "normalize_views", "PendingViews",
           "FastMultiCrop", "AUGMENTATIONS"]

#: ``pretrain.augmentation`` choices: the official PIL transforms, this module in the data workers,
#: or this module's photometric part on the training device.
AUGMENTATIONS = ("official", "fast", "gpu")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)`` of the official recipe.
JITTER = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_P, FLIP_P, GRAY_P = 0.8, 0.5, 0.2
BLUR_RADIUS = (0.1, 2.0)
#: ITU-R 601-2 luma, as PIL's ``convert("L")`` and torchvision's ``rgb_to_grayscale``.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewRecipe:
    """One kind of view: output size, ``RandomResizedCrop`` scale, blur and solarization probabilities
    (``solarize_p`` 0: the view has no ``Solarization`` transform, which then draws nothing)."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def ibot_view_recipes(global_crops_scale: tuple[float, float], local_crops_scale: tuple[float, float],
                      global_crops_number: int, local_crops_number: int, global_crops_size: int,
                      local_crops_size: int) -> list[ViewRecipe]:
    """The views of ``DataAugmentationIBOT`` in its order: the first global crop always blurred, the
    other globals blurred with p=0.1 and solarized with p=0.2, the locals blurred with p=0.5."""
    first = ViewRecipe(global_crops_size, tuple(global_crops_scale), 1.0, 0.0)
    other = ViewRecipe(global_crops_size, tuple(global_crops_scale), 0.1, 0.2)
    local = ViewRecipe(local_crops_size, tuple(local_crops_scale), 0.5, 0.0)
    return [first] + [other] * (global_crops_number - 1) + [local] * local_crops_number


class PhotometricParams(NamedTuple):
    """Photometric parameters, one row per view (tensors, so that they batch and move to a device).

    ``jitter_order`` [N, 4]: the order in which brightness (0), contrast (1), saturation (2), hue (3)
    are applied; ``jitter_factors`` [N, 4]: their factors (1, 1, 1, 0 = identity); ``blur_sigma`` [N]:
    0 for no blur.
    """

    flip: Tensor
    jitter: Tensor
    jitter_order: Tensor
    jitter_factors: Tensor
    gray: Tensor
    blur_sigma: Tensor
    solarize: Tensor

    @classmethod
    def from_draws(cls, draws: Sequence[ViewDraw]) -> PhotometricParams:
        """One row per draw (tensors built once per image: each ``torch.tensor`` call costs ~10 us)."""
        return cls(torch.tensor([d.flip for d in draws]), torch.tensor([d.jitter for d in draws]),
                   torch.tensor([d.jitter_order for d in draws], dtype=torch.long),
                   torch.tensor([d.jitter_factors for d in draws], dtype=torch.float32),
                   torch.tensor([d.gray for d in draws]), torch.tensor([d.blur_sigma for d in draws]),
                   torch.tensor([d.solarize for d in draws]))

    @classmethod
    def cat(cls, rows: Sequence[PhotometricParams]) -> PhotometricParams:
        return cls(*(torch.cat(field) for field in zip(*rows)))

    def rows(self, start: int, stop: int) -> PhotometricParams:
        return PhotometricParams(*(t[start:stop] for t in self))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PhotometricParams:
        return PhotometricParams(*(t.to(device, non_blocking=non_blocking) for t in self))


class ViewDraw(NamedTuple):
    """A view's random draw: crop box in the full-size image (top, left, height, width), flip, colour
    jitter (applied, op order, factors), grayscale, blur sigma (0: none), solarization."""

    box: tuple[int, int, int, int]
    flip: bool
    jitter: bool
    jitter_order: tuple[int, int, int, int]
    jitter_factors: tuple[float, float, float, float]
    gray: bool
    blur_sigma: float
    solarize: bool


def sample_view(recipe: ViewRecipe, image: Image.Image) -> ViewDraw:
    """Draw one view's parameters from the global ``torch`` and ``random`` RNGs exactly as the official
    ``Compose([RandomResizedCrop, flip, RandomApply(ColorJitter), RandomGrayscale, GaussianBlur,
    Solarization])`` draws them (``image`` only provides its size: a lazily opened file suffices)."""
    box = transforms.RandomResizedCrop.get_params(image, list(recipe.scale), list(recipe.ratio))
    flip = bool(torch.rand(1) < FLIP_P)
    jitter = not (JITTER_P < torch.rand(1))  # RandomApply: skipped when p < rand
    order, factors = (0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0)
    if jitter:
        fn_idx, b, c, s, h = transforms.ColorJitter.get_params(JITTER.brightness, JITTER.contrast,
                                                               JITTER.saturation, JITTER.hue)
        order, factors = tuple(fn_idx.tolist()), (b, c, s, h)
    gray = bool(torch.rand(1) < GRAY_P)
    sigma = 0.0 if random.random() > recipe.blur_p else random.uniform(*BLUR_RADIUS)  # official: apply if <= p
    solarize = recipe.solarize_p > 0 and random.random() < recipe.solarize_p  # no Solarization, no draw
    return ViewDraw(tuple(int(v) for v in box), flip, jitter, order, factors, gray, sigma, solarize)


def draft_factor(boxes: Sequence[tuple[int, int, int, int]], sizes: Sequence[int]) -> int:
    """The largest JPEG DCT scale denominator (1, 2, 4 or 8) after which every crop box still holds at
    least twice its output size along both sides: the DCT-domain reduction only removes detail the
    antialiased resize that follows would remove anyway, which still does the final (>= 2x) filtering."""
    room = min(min(h, w) / size for (_, _, h, w), size in zip(boxes, sizes))
    factor = 1
    while factor < 8 and room >= 4 * factor:
        factor *= 2
    return factor


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    """``ratio * a + (1 - ratio) * b`` clamped to [0, 1] (torchvision's ``_blend``), ``ratio`` per view."""
    ratio = ratio.view(-1, 1, 1, 1)
    return (a * ratio).add_(b * (1.0 - ratio)).clamp_(0.0, 1.0)


def _luma(x: Tensor) -> Tensor:
    """[N, 1, H, W] grayscale of [N, 3, H, W] RGB in [0, 1]."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)  # blend with black


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _luma(x), factor)


def _hue(x: Tensor, factor: Tensor) -> Tensor:
    """Shift the HSV hue by ``factor`` turns per view, computed in RGB without HSV planes: value (max)
    and chroma (max - min) are unchanged by a hue shift, and channel n of the result is
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h') mod 6`` (n = 5, 3, 1 for R, G,
    B), the closed form of HSV -> RGB. Same values as PIL's/torchvision's HSV round trip (a maximum
    shared by two channels resolved R, then G, then B, as they do); elementwise ops only."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # 6 x hue: (g - b)/c where R is the max, 2 + (b - r)/c where G is, 4 + (r - g)/c where B is
    numerator = torch.where(r == maxc, g - b, torch.where(g == maxc, (b - r).add_(chroma, alpha=2.0),
                                                          (r - g).add_(chroma, alpha=4.0)))
    sextant = numerator.div_(chroma.clamp_min(1e-12)).add_((6.0 * factor + 6.0).view(-1, 1, 1))  # > 0
    out = torch.empty_like(x)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):
        k = sextant + offset
        k = k.sub_(torch.floor(k / 6.0).mul_(6.0))  # mod 6 (k > 0)
        torch.minimum(k, 4.0 - k, out=out[:, channel]).clamp_(0.0, 1.0).mul_(chroma).neg_().add_(maxc)
    return out


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)  # ColorJitter's fn_idx numbering


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a standard deviation per view (edge pixels replicated, as Pillow's
    box blur does), as shifted multiply-adds (faster than a depthwise convolution on a CPU); the
    kernel spans +-3 sigma of the largest sigma of the batch."""
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.to(x.dtype)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(len(x), 1, 1, 1, -1)  # [N, 1, 1, 1, K]
    for dim in (-1, -2):  # along W, then along H
        length = x.shape[dim]
        padded = F.pad(x, (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius), mode="replicate")
        x = padded.narrow(dim, 0, length) * kernel[..., 0]
        for tap in range(1, 2 * radius + 1):
            x.addcmul_(padded.narrow(dim, tap, length), kernel[..., tap])
    return x


def _where_views(mask: Tensor, x: Tensor, op, *args: Tensor) -> None:
    """Apply ``op`` in place to the views selected by ``mask`` (every op is per view). On a CPU one
    view at a time (each stays in the caches; no gather/scatter copies), on a GPU as one batch."""
    index = mask.nonzero().squeeze(1)
    if x.device.type == "cpu":
        for i in index.tolist():
            x[i:i + 1] = op(x[i:i + 1], *(a[i:i + 1] for a in args))
    elif index.numel():
        x[index] = op(x[index], *(a[index] for a in args))


def _solarize(x: Tensor) -> Tensor:
    return torch.where(x >= 127.5 / 255.0, 1.0 - x, x)  # PIL: invert uint8 values >= 128


def _grayscale(x: Tensor) -> Tensor:
    return _luma(x).expand(-1, 3, -1, -1)


def apply_photometric(crops: Tensor, params: PhotometricParams, normalize: bool = True,
                      out: Tensor | None = None) -> Tensor:
    """Flip, colour jitter, grayscale, blur and solarize a batch of uint8 views [N, 3, H, W] with their
    per-view parameters, in the official order; returns float32 views (ImageNet-normalised if
    ``normalize``), written into ``out`` when given."""
    x = out if out is not None else torch.empty(crops.shape, dtype=torch.float32, device=crops.device)
    x.copy_(crops).div_(255.0)
    _where_views(params.flip, x, lambda v: v.flip(-1))
    for slot in range(4):  # ColorJitter applies its four ops in a random order per view
        for op_index, op in enumerate(_JITTER_OPS):
            selected = params.jitter & (params.jitter_order[:, slot] == op_index)
            _where_views(selected, x, op, params.jitter_factors[:, op_index])
    _where_views(params.gray, x, _grayscale)
    _where_views(params.blur_sigma > 0, x, _gaussian_blur, params.blur_sigma)
    _where_views(params.solarize, x, _solarize)
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x.sub_(mean).div_(std)
    return x


def _cv2():
    import cv2  # OpenCV (an mmcv dependency): SIMD uint8 kernels; imported where used

    cv2.setNumThreads(1)  # one view at a time in a data worker: OpenCV's own threads only add overhead
    return cv2


def photometric_uint8(view: np.ndarray, draw: ViewDraw) -> np.ndarray:
    """The official photometric ops on one uint8 HxWx3 RGB view, with OpenCV's SIMD uint8 kernels and
    PIL's semantics (used by ``augmentation: fast`` in the data workers): rounding to uint8 after
    each op, contrast around the rounded mean luma, hue shifted on 8-bit HSV with wrap-around (PIL's
    and torchvision's ``adjust_hue``), Gaussian blur with replicated edges, solarize at 128."""
    cv2 = _cv2()
    if draw.flip:
        view = cv2.flip(view, 1)
    if draw.jitter:
        for op in draw.jitter_order:
            factor = draw.jitter_factors[op]
            if op == 0:  # brightness: blend with black
                view = cv2.addWeighted(view, factor, view, 0.0, 0.0)
            elif op == 1:  # contrast: blend with the mean luma (PIL rounds it to an integer)
                mean = int(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY).mean() + 0.5)
                view = cv2.addWeighted(view, factor, view, 0.0, (1.0 - factor) * mean)
            elif op == 2:  # saturation: blend with the luma image
                gray = cv2.cvtColor(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
                view = cv2.addWeighted(view, factor, gray, 1.0 - factor, 0.0)
            else:  # hue: 8-bit HSV (hue in 256 steps, as PIL's), shift with uint8 wrap-around
                hsv = cv2.cvtColor(view, cv2.COLOR_RGB2HSV_FULL)
                hsv[..., 0] += np.uint8(int(factor * 255) % 256)
                view = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    if draw.gray:
        view = cv2.cvtColor(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    if draw.blur_sigma > 0:
        view = cv2.GaussianBlur(view, (0, 0), draw.blur_sigma, borderType=cv2.BORDER_REPLICATE)
    if draw.solarize:
        view = cv2.LUT(view, _SOLARIZE_LUT)
    return view


_SOLARIZE_LUT = np.array([i if i < 128 else 255 - i for i in range(256)], dtype=np.uint8)


def normalize_views(crops: Tensor) -> Tensor:
    """uint8 views [N, 3, H, W] -> float32, ImageNet-normalised (ToTensor + Normalize, batched)."""
    mean = torch.tensor(IMAGENET_MEAN, device=crops.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=crops.device).view(1, 3, 1, 1)
    return crops.float().div_(255.0).sub_(mean).div_(std)


class PendingViews(NamedTuple):
    """uint8 views of one sample ([3, S, S] per view) or of a collated batch ([B, 3, S, S] per view),
    their photometric draws (one row per image of ``torch.cat(crops)``, view-major) and whether the
    photometric ops were already applied (``augmentation: fast``: in the worker, with OpenCV) or are
    still to do (``gpu``: :func:`apply_photometric` on the training device)."""

    crops: list[Tensor]
    params: PhotometricParams
    photometric_done: bool = False

    def finish(self, device: torch.device | str = "cpu") -> list[Tensor]:
        """The official float views on ``device`` (ImageNet-normalised)."""
        device = torch.device(device)
        crops = [c.to(device, non_blocking=True) for c in self.crops]
        if self.photometric_done:
            return _per_size_runs(crops, normalize_views)
        params = self.params.to(device, non_blocking=True)
        # on a CPU, chunks of ~1M values stay in the caches across the ~40 elementwise passes
        return photometric_views(crops, params, max_elements=1 << 20 if device.type == "cpu" else None)


class FastMultiCrop:
    """Multi-crop views of one image file (or PIL image) with the official random draws.

    ``__call__`` returns :class:`PendingViews`: one [3, S, S] uint8 tensor per view (in the official
    order) and their :class:`PhotometricParams`; with ``photometric_on_cpu`` the photometric ops are
    applied here (OpenCV, :func:`photometric_uint8`), else they are left to :func:`photometric_views`
    on whatever device the views go to. Random draws come from the global RNGs, which the caller
    seeds (``MultiCropMaskedDataset`` does, per sample).
    """

    def __init__(self, recipes: Sequence[ViewRecipe], photometric_on_cpu: bool = False) -> None:
        self.recipes = list(recipes)
        self.photometric_on_cpu = photometric_on_cpu

    def __call__(self, source: str | os.PathLike | Image.Image) -> PendingViews:
        if isinstance(source, Image.Image):
            return self._views(source, lazily_opened=False)
        with open(source, "rb") as handle:
            return self._views(Image.open(handle), lazily_opened=True)

    def _views(self, image: Image.Image, lazily_opened: bool) -> PendingViews:
        full_width, full_height = image.size
        views = [sample_view(recipe, image) for recipe in self.recipes]
        pixels = None
        if lazily_opened and image.format == "JPEG":  # not decoded yet: DCT-domain downscaling is free
            factor = draft_factor([v.box for v in views], [r.size for r in self.recipes])
            if factor > 1:
                image.draft("RGB", (math.ceil(full_width / factor), math.ceil(full_height / factor)))
            elif image.mode == "RGB":  # libjpeg-turbo straight into a tensor: same pixels, no PIL->numpy copy
                image.fp.seek(0)
                data = torch.frombuffer(bytearray(image.fp.read()), dtype=torch.uint8)
                pixels = decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).contiguous().permute(2, 0, 1)
        if pixels is None:
            if image.mode != "RGB":
                image = image.convert("RGB")
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        # pixels: [3, H, W] stored channels-last, the layout of the fast uint8 antialiased resize (its
        # output is channels-last too: .permute(1, 2, 0) is an HxWx3 array without a copy)
        scale_y, scale_x = pixels.shape[1] / full_height, pixels.shape[2] / full_width
        crops = []
        for draw, recipe in zip(views, self.recipes):
            top, left, height, width = draw.box
            y0, x0 = round(top * scale_y), round(left * scale_x)
            y1, x1 = max(y0 + 1, round((top + height) * scale_y)), max(x0 + 1, round((left + width) * scale_x))
            region = pixels[:, y0:y1, x0:x1].unsqueeze(0)
            crop = F.interpolate(region, size=(recipe.size, recipe.size), mode="bicubic", antialias=True,
                                 align_corners=False)[0]
            if self.photometric_on_cpu:
                crop = torch.from_numpy(photometric_uint8(np.ascontiguousarray(crop.permute(1, 2, 0).numpy()),
                                                          draw)).permute(2, 0, 1)
            crops.append(crop.contiguous())
        return PendingViews(crops, PhotometricParams.from_draws(views), self.photometric_on_cpu)


def _per_size_runs(crops: Sequence[Tensor], fn) -> list[Tensor]:
    """``fn`` on each run of equal-size views at once (views [3, S, S] or batches [B, 3, S, S]); the
    outputs keep each input's shape."""
    batches = [c if c.dim() == 4 else c.unsqueeze(0) for c in crops]
    out: list[Tensor] = []
    start = 0
    while start < len(batches):
        end = start + 1
        while end < len(batches) and batches[end].shape[1:] == batches[start].shape[1:]:
            end += 1
        out.extend(fn(torch.cat(batches[start:end])).split([len(b) for b in batches[start:end]]))
        start = end
    return [o if c.dim() == 4 else o[0] for o, c in zip(out, crops)]


def photometric_views(crops: Sequence[Tensor], params: PhotometricParams, max_elements: int | None = None
                      ) -> list[Tensor]:
    """Float views from uint8 views with :func:`apply_photometric`, batched over every run of
    equal-size views.

    ``crops[i]`` is one view ([3, S, S]) or a batch of it ([B, 3, S, S], as collated); ``params`` has
    one row per image of ``torch.cat`` of them, in that order. The output keeps each one's shape.
    ``max_elements`` splits the batched calls into chunks of at most that many values (on a CPU,
    chunks that stay in the caches are faster than one pass over the whole batch per operation).
    """
    total = sum(len(c) if c.dim() == 4 else 1 for c in crops)
    if total != len(params.flip):
        raise ValueError(f"{total} views but {len(params.flip)} rows of parameters")
    row = 0

    def run(group: Tensor) -> Tensor:
        nonlocal row
        views = torch.empty(group.shape, dtype=torch.float32, device=group.device)
        chunk = len(group) if max_elements is None else max(1, max_elements // group[0].numel())
        for i in range(0, len(group), chunk):
            stop = min(i + chunk, len(group))
            apply_photometric(group[i:stop], params.rows(row + i, row + stop), out=views[i:stop])
        row += len(group)
        return views

    return _per_size_runs(crops, run)
