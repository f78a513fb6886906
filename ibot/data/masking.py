"""Patch masks for masked image modeling, as the official ``ImageFolderMask`` (bytedance/ibot ``loader.py``).

Two shapes: ``block`` (BEiT-style union of random rectangles) and ``rand`` (uniformly chosen patches).
The prediction ratio is drawn per crop. All randomness comes from an explicit ``np.random.Generator``
so that masks are a pure function of the generator's seed (reproducible resumes, worker-independent);
draws mirror the official ``random`` calls one for one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["MaskGenerator"]


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """``random.uniform`` semantics (``low + (high - low) * U[0, 1)``, also for ``high < low``)."""
    return low + (high - low) * rng.random()


class MaskGenerator:
    """Callable producing a bool [h, w] patch mask (True = masked/predicted) for one crop.

    Args:
        patch_size: pixels per patch side; ``mask_for_crop`` uses it to get the patch grid of a crop.
        pred_ratio: target masked fraction, or a list of them (one is picked per crop).
        pred_ratio_var: half-width of the uniform jitter around each ratio (0 disables); a scalar is
            broadcast to every entry of a ratio list.
        pred_aspect_ratio: aspect-ratio range of block rectangles (sampled log-uniformly).
        pred_shape: ``'block'`` or ``'rand'``.
        pred_start_epoch: no masking (ratio 0) before this epoch, once ``set_epoch`` has been called.
    """

    def __init__(self, patch_size: int, pred_ratio: float | Sequence[float], pred_ratio_var: float | Sequence[float],
                 pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3), pred_shape: str = "block",
                 pred_start_epoch: int = 0) -> None:
        if pred_shape not in ("block", "rand"):
            raise ValueError(f"unknown pred_shape {pred_shape!r}; expected 'block' or 'rand'")
        ratios = list(pred_ratio) if isinstance(pred_ratio, Sequence) else [pred_ratio]
        variances = list(pred_ratio_var) if isinstance(pred_ratio_var, Sequence) else [pred_ratio_var]
        if len(variances) == 1:
            variances = variances * len(ratios)
        if len(variances) != len(ratios):
            raise ValueError(f"pred_ratio_var {variances} does not match pred_ratio {ratios}")
        if any(var > ratio for ratio, var in zip(ratios, variances)):
            raise ValueError(f"each pred_ratio must be >= its pred_ratio_var, got {ratios} and {variances}")
        self.patch_size = patch_size
        self.pred_ratio = ratios
        self.pred_ratio_var = variances
        self.log_aspect_ratio = (math.log(pred_aspect_ratio[0]), math.log(pred_aspect_ratio[1]))
        self.pred_shape = pred_shape
        self.pred_start_epoch = pred_start_epoch
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def get_pred_ratio(self, rng: np.random.Generator) -> float:
        """Masked fraction for one crop: each ratio jittered by U(r - var, r + var) (unchanged when
        var == 0), then one picked at random when several are given; 0 before ``pred_start_epoch``."""
        if self.epoch is not None and self.epoch < self.pred_start_epoch:
            return 0.0
        ratios = [_uniform(rng, r - v, r + v) if v > 0 else r for r, v in zip(self.pred_ratio, self.pred_ratio_var)]
        if len(ratios) == 1:
            return float(ratios[0])
        return float(ratios[rng.integers(len(ratios))])

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """Bool mask [height, width] for one crop of height x width patches."""
        num_masked = self.get_pred_ratio(rng) * height * width  # a float target, as official
        if self.pred_shape == "block":
            return self.block_mask(height, width, num_masked, rng)[0]
        flat = np.zeros(height * width, dtype=bool)
        flat[: int(num_masked)] = True
        return rng.permutation(flat).reshape(height, width)

    def mask_for_crop(self, crop_height: int, crop_width: int, rng: np.random.Generator) -> np.ndarray:
        """Mask for a crop given in pixels (patch grid = pixels // patch_size)."""
        return self(crop_height // self.patch_size, crop_width // self.patch_size, rng)

    def block_mask(self, height: int, width: int, num_masked: float, rng: np.random.Generator
                   ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """BEiT block masking: add random rectangles until ``num_masked`` patches are covered, each
        adding at most the remaining budget; a round of 10 failed attempts ends the loop early.

        Returns the mask and the rectangles it is the union of, as (top, left, h, w)."""
        mask = np.zeros((height, width), dtype=bool)
        rectangles = []
        min_area = (min(height, width) // 3) ** 2
        mask_count = 0
        while mask_count < num_masked:
            remaining = num_masked - mask_count
            delta = 0
            for _ in range(10):
                target_area = _uniform(rng, min_area, remaining)
                aspect_ratio = math.exp(_uniform(rng, *self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < width and h < height:
                    top = int(rng.integers(0, height - h, endpoint=True))
                    left = int(rng.integers(0, width - w, endpoint=True))
                    new = h * w - int(mask[top: top + h, left: left + w].sum())
                    if 0 < new <= remaining:
                        mask[top: top + h, left: left + w] = True
                        rectangles.append((top, left, h, w))
                        delta += new
                if delta > 0:
                    break
            if delta == 0:
                break
            mask_count += delta
        return mask, rectangles
