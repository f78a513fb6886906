"""Drawing primitives shared by the embedded sets: shapes, textures, colours, backgrounds, seeding, savers.

Shapes are polygons in unit coordinates, placed (centre, radius, rotation) and rasterised exactly as
pycocotools' ``annToMask`` does, so the COCO polygons and the pixel masks agree. Every random stream
comes from :func:`seeded_rng` keyed by (seed, set, split, class, index): an image's bytes depend on its
keys only, never on the order or the process that draws it.
"""

from __future__ import annotations

import colorsys
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ibot.data.embedded.classes import ClassSpec

__all__ = [
    "JPEG_QUALITY",
    "SHAPE_NAMES",
    "TEXTURES",
    "Placement",
    "place_shape",
    "textured_fill",
    "random_placement",
    "smooth_noise",
    "draw_solid",
    "background",
    "to_uint8",
    "tight_box",
    "Layers",
    "object_layers",
    "seeded_rng",
    "save_jpeg",
    "save_png",
    "write_text",
    "dump_json",
]

JPEG_QUALITY = 90


# ---------------------------------------------------------------- shapes & textures


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _ellipse(rx: float, ry: float, cx: float = 0.0, n: int = 40) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    return np.stack([cx + rx * np.cos(t), ry * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


# Shape families in unit coordinates (all vertices inside the unit disk, so any
# rotation stays within ``radius`` of the centre): (filled polygons, holes).
_SHAPES: dict[str, tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]] = {
    "disk": ((_ellipse(1.0, 1.0),), ()),
    "square": ((_rect(-0.7, -0.7, 0.7, 0.7),), ()),
    "triangle": ((_regular(3, phase=-np.pi / 2),), ()),
    "star": ((_star(),), ()),
    "cross": ((_rect(-0.93, -0.3, 0.93, 0.3), _rect(-0.3, -0.93, 0.3, 0.93)), ()),
    "ellipse": ((_ellipse(1.0, 0.55),), ()),
    "hexagon": ((_regular(6),), ()),
    "arrow": (
        (np.array([[-0.95, -0.25], [0.3, -0.25], [0.3, -0.6], [1.0, 0.0], [0.3, 0.6], [0.3, 0.25], [-0.95, 0.25]]),),
        (),
    ),
    "ring": ((_ellipse(1.0, 1.0),), (_ellipse(0.55, 0.55),)),
    "crescent": ((_ellipse(1.0, 1.0),), (_ellipse(0.85, 0.85, cx=0.45),)),
}
SHAPE_NAMES: tuple[str, ...] = tuple(_SHAPES)
TEXTURES: tuple[str, ...] = ("stripes", "checker", "dots", "rings", "waves")


@dataclass(frozen=True)
class Placement:
    """Where an object lies: centre (x, y) in pixels, radius in pixels, rotation in radians."""

    cx: float
    cy: float
    radius: float
    angle: float


def _place_polygon(unit: np.ndarray, p: Placement) -> list[float]:
    """Rotate/scale/translate a unit polygon into a flat COCO [x1, y1, x2, y2, ...] list."""
    c, s = np.cos(p.angle), np.sin(p.angle)
    x = p.cx + p.radius * (c * unit[:, 0] - s * unit[:, 1])
    y = p.cy + p.radius * (s * unit[:, 0] + c * unit[:, 1])
    return np.round(np.stack([x, y], axis=1), 2).ravel().tolist()


def _rasterize(polygons: list[list[float]], size: int) -> np.ndarray:
    """Union of polygons as a bool mask, rasterised exactly as pycocotools' annToMask does."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, size, size))
    return mask_utils.decode(rle).astype(bool)


def place_shape(shape: str, p: Placement, size: int) -> tuple[np.ndarray, list[list[float]]]:
    """Mask of a placed shape and the polygons of its filled parts (for COCO)."""
    fills, holes = _SHAPES[shape]
    polygons = [_place_polygon(poly, p) for poly in fills]
    mask = _rasterize(polygons, size)
    if holes:
        mask &= ~_rasterize([_place_polygon(poly, p) for poly in holes], size)
    return mask, polygons


def _texture(kind: str, freq: float, p: Placement, size: int) -> np.ndarray:
    """Binary pattern in the object's own (rotated, scaled) frame, as an HxW float in {0, 1}."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c, s = np.cos(p.angle), np.sin(p.angle)
    dx, dy = (xx - p.cx) / p.radius, (yy - p.cy) / p.radius
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "stripes":
        pattern = np.floor(u * freq) % 2
    elif kind == "checker":
        pattern = (np.floor(u * freq) + np.floor(v * freq)) % 2
    elif kind == "dots":
        cell = 1.0 / freq
        fu, fv = (u % cell) / cell - 0.5, (v % cell) / cell - 0.5
        pattern = (fu**2 + fv**2 < 0.1).astype(float)
    elif kind == "rings":
        pattern = np.floor(np.hypot(u, v) * freq * 1.5) % 2
    elif kind == "waves":
        pattern = np.floor((u + 0.2 * np.sin(np.pi * freq * v)) * freq) % 2
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return pattern


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours that differ clearly in every channel (texture stays visible)."""
    c1 = rng.uniform(0, 255, 3)
    c2 = (c1 + 128 + rng.uniform(-48, 48, 3)) % 256
    return c1, c2


def _class_colours(rng: np.random.Generator, hue: float) -> tuple[np.ndarray, np.ndarray]:
    """A bright saturated colour near ``hue`` (+-0.04) and a dark, greyer one of the same hue."""
    h = (hue + rng.uniform(-0.04, 0.04)) % 1.0
    bright = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    dark = colorsys.hsv_to_rgb(h, rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.35))
    return 255 * np.array(bright), 255 * np.array(dark)


def textured_fill(rng: np.random.Generator, kind: str, freq: float, p: Placement, size: int,
                  hue: float | None = None) -> np.ndarray:
    """HxWx3 float colour field of a textured object (valid wherever its mask is set): random
    contrasting colours, or the class colours of ``hue``."""
    c1, c2 = _contrasting_colours(rng) if hue is None else _class_colours(rng, hue)
    pattern = _texture(kind, freq, p, size)[..., None]
    return c1 * (1 - pattern) + c2 * pattern


def random_placement(rng: np.random.Generator, size: int, diameter: tuple[float, float]) -> Placement:
    """Uniform placement with diameter fraction in ``diameter``, fully inside the image."""
    radius = rng.uniform(*diameter) * size / 2
    cx, cy = rng.uniform(radius, size - radius, 2)
    return Placement(float(cx), float(cy), float(radius), float(rng.uniform(0, 2 * np.pi)))


# ---------------------------------------------------------------- backgrounds


def smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Bicubically upsampled coarse colour noise (float HxWx3)."""
    grid = int(rng.integers(2, 7))
    small = Image.fromarray(rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8))
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 HxWx3 image with a photograph's 1/f-like spectrum (colour noise at every octave, partly
    correlated across channels), so that JPEG files of it decode at ImageNet-like cost and size
    (500x375 at quality 90: ~75 kB). For throughput benchmarks and augmentation statistics."""
    image = np.zeros((height, width, 3))
    for octave in range(8):
        step = 2 ** octave
        noise = rng.standard_normal((height // step + 2, width // step + 2, 3))
        noise = 0.6 * noise + 0.4 * noise.mean(axis=2, keepdims=True)
        noise = to_uint8((noise - noise.min()) / max(np.ptp(noise), 1e-9) * 255)
        image += np.asarray(Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    return to_uint8((image - image.min()) / max(np.ptp(image), 1e-9) * 255)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = ((t - t.min()) / max(np.ptp(t), 1e-9))[..., None]
    return rng.uniform(0, 255, 3) * (1 - t) + rng.uniform(0, 255, 3) * t


def draw_solid(canvas: np.ndarray, rng: np.random.Generator, count: int, diameter: tuple[float, float]) -> np.ndarray:
    """Paint ``count`` solid shapes from the shared pool; returns the union of their masks."""
    size = canvas.shape[0]
    union = np.zeros((size, size), dtype=bool)
    for _ in range(count):
        shape = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
        mask, _ = place_shape(shape, random_placement(rng, size, diameter), size)
        canvas[mask] = rng.uniform(0, 255, 3)
        union |= mask
    return union


def background(rng: np.random.Generator, size: int, clutter: tuple[int, int]) -> np.ndarray:
    """Varied background: noise/gradient blend + grain + small solid distractors (float HxWx3)."""
    alpha = rng.uniform(0.3, 1.0)
    bg = alpha * smooth_noise(rng, size) + (1 - alpha) * _gradient(rng, size)
    bg += rng.normal(0, rng.uniform(0, 8), bg.shape)
    draw_solid(bg, rng, int(rng.integers(clutter[0], clutter[1] + 1)), (0.08, 0.2))
    return bg


def to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (y0, y1, x0, x1) half-open box of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


# ---------------------------------------------------------------- one classification sample


@dataclass(frozen=True)
class Layers:
    """One classification sample: background, object colours and the exact object mask."""

    background: np.ndarray  # HxWx3 uint8
    foreground: np.ndarray  # HxWx3 uint8, meaningful where ``mask``
    mask: np.ndarray  # HxW bool

    @property
    def image(self) -> np.ndarray:
        return np.where(self.mask[..., None], self.foreground, self.background)


def object_layers(
    rng: np.random.Generator, spec: ClassSpec, size: int, diameter: tuple[float, float], clutter: tuple[int, int],
    background_contrast: float = 1.0,
) -> Layers:
    """Background, textured class object and its mask; ``background_contrast`` < 1 flattens the
    background towards its mean colour."""
    bg = background(rng, size, clutter)
    mean = bg.mean(axis=(0, 1), keepdims=True)
    bg = mean + background_contrast * (bg - mean)
    placement = random_placement(rng, size, diameter)
    mask, _ = place_shape(spec.shape, placement, size)
    foreground = textured_fill(rng, spec.texture, spec.freq, placement, size, spec.hue)
    return Layers(to_uint8(bg), to_uint8(foreground), mask)


# ---------------------------------------------------------------- seeding & io


def seeded_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """Independent stream per (seed, *keys); strings enter via a stable CRC32."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    return np.random.default_rng(words)


def save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def save_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels).save(path, format="PNG")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def dump_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): stable bytes for the manifests' hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
