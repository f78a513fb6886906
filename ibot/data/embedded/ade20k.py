"""Embedded ADE20K: ``ADEChallengeData2016/{images,annotations}/{training,validation}/``.

JPEG images and mode-'L' PNG labels, 0 = other/ignore, 1..K classes (:data:`ADE_CLASSES`, listed in
``ADEChallengeData2016/classes.txt``: line i names label i). A scene is a top stuff class (wall|sky)
over a bottom one (floor|grass) along a wavy horizon, with 1-3 things and unlabelled distractors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.render import (draw_solid, place_shape, random_placement, save_jpeg, save_png, seeded_rng,
                                       smooth_noise, textured_fill, to_uint8, write_text)

__all__ = ["BUILDER", "ADE_CLASSES"]

# ADE20K-style label ids 1..K (0 = other); stuff first, then things (shape, texture, freq).
ADE_CLASSES: tuple[str, ...] = ("wall", "sky", "floor", "grass", "person", "car", "tree", "lamp", "painting")
_ADE_THINGS: dict[int, tuple[str, str, float]] = {
    5: ("ellipse", "stripes", 3.0),
    6: ("square", "dots", 3.0),
    7: ("star", "waves", 3.0),
    8: ("triangle", "rings", 3.0),
    9: ("hexagon", "checker", 3.0),
}


def _jitter(rng: np.random.Generator, base: tuple[int, int, int], amount: float = 30) -> np.ndarray:
    return np.clip(np.array(base, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 255)


def _stuff(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Full-image texture of a stuff class (wall bricks, sky gradient, floor tiles, grass)."""
    yy, xx = np.mgrid[0:size, 0:size]
    if label == 1:  # wall: bricks with mortar lines
        b = int(rng.integers(max(3, size // 16), max(4, size // 8) + 1))
        mortar = (yy % b == 0) | ((xx + (yy // b % 2) * b) % (2 * b) == 0)
        return np.where(mortar[..., None], _jitter(rng, (220, 210, 190)), _jitter(rng, (160, 80, 55)))
    if label == 2:  # sky: vertical gradient with soft clouds
        t = (yy / size)[..., None]
        sky = _jitter(rng, (70, 120, 220)) * (1 - t) + _jitter(rng, (170, 200, 240)) * t
        clouds = np.clip((smooth_noise(rng, size).mean(-1, keepdims=True) - 150) / 60, 0, 1)
        return sky * (1 - clouds) + 245 * clouds
    if label == 3:  # floor: two-tone tiles
        t = int(rng.integers(max(4, size // 16), max(5, size // 8) + 1))
        checker = ((yy // t + xx // t) % 2)[..., None]
        return _jitter(rng, (120, 120, 120)) * (1 - checker) + _jitter(rng, (180, 175, 165)) * checker
    if label == 4:  # grass: vertical blade streaks
        streaks = rng.uniform(-40, 40, size)[None, :, None] + rng.normal(0, 15, (size, size, 1))
        return _jitter(rng, (70, 140, 50)) + streaks * np.array([0.4, 1.0, 0.4])
    raise ValueError(f"not a stuff label: {label}")


def _ade_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene = top stuff (wall|sky) over bottom stuff (floor|grass) along a wavy horizon,
    1-3 things (labels 5..9) and 0-3 unlabelled distractors (label 0)."""
    rng = seeded_rng(seed, "ade20k", split, index)
    top, bottom = int(rng.choice([1, 2])), int(rng.choice([3, 4]))
    xx = np.arange(size)
    horizon = size * rng.uniform(0.3, 0.6) + size * rng.uniform(0, 0.08) * np.sin(
        2 * np.pi * xx / rng.uniform(0.5, 2) / size + rng.uniform(0, 2 * np.pi)
    )
    below = np.arange(size)[:, None] >= horizon[None, :]
    labels = np.where(below, bottom, top).astype(np.uint8)
    image = np.where(below[..., None], _stuff(rng, bottom, size), _stuff(rng, top, size))
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(5, len(ADE_CLASSES) + 1))
        shape, texture, freq = _ADE_THINGS[label]
        p = random_placement(rng, size, (0.2, 0.45))
        mask, _ = place_shape(shape, p, size)
        image[mask] = textured_fill(rng, texture, freq, p, size)[mask]
        labels[mask] = label
    other = draw_solid(image, rng, int(rng.integers(0, 4)), (0.06, 0.15))
    labels[other] = 0
    return to_uint8(image), labels


def _ade_file(root: str, seed: int, sizes: EmbeddedSizes, split: str, index: int) -> None:
    folder, prefix = ("training", "train") if split == "train" else ("validation", "val")
    image, labels = _ade_sample(seed, split, index, sizes.ade_size)
    stem = f"ADE_{prefix}_{index + 1:08d}"
    save_jpeg(Path(root) / "images" / folder / f"{stem}.jpg", image)
    save_png(Path(root) / "annotations" / folder / f"{stem}.png", labels)


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    tasks = [
        (str(root), seed, sizes, split, i)
        for split, n in (("train", sizes.ade_train), ("val", sizes.ade_val))
        for i in range(n)
    ]
    list(run(_ade_file, tasks))
    write_text(root / "classes.txt", "".join(f"{name}\n" for name in ADE_CLASSES))


BUILDER = SetBuilder(("ade_train", "ade_val", "ade_size"), _build)
