"""Deterministic generator of small synthetic datasets in the REAL on-disk formats.

Why: every stage of the reproduction (pretraining, k-NN/linear/fine-tune,
COCO detection, ADE20K segmentation, ImageNet-C/-A, ImageNet-9 backgrounds)
must run end to end on a CPU without the real data, through the very loaders
that read the real data.  The images carry learnable structure: each class is
a distinct shape family filled with a class-specific texture (stripe / checker
/ dot / ring / wave pattern at a class-specific frequency) in the class's
colours (a bright and a dark shade near a class hue, like real object classes
have colour statistics; COCO/ADE20K objects use random colours), at random
scale, position and rotation over varied backgrounds (smooth noise, gradients,
clutter of small distractors).  Why class hues: self-supervised training first
learns the invariants two crops of an image share; with per-image random
colours those identify the image, not its class, and a few hundred iterations
of iBOT made features worse than random ones (see README "Embedded default").
The exact object masks drive the COCO / ADE20K annotations and the ImageNet-9
background variants.

Sets and layouts (relative to ``--out``):

* ``imagenet/{train,val}/<wnid>/*.JPEG`` plus ``classes.json`` and
  ``LOC_synset_mapping.txt``; the wnids are real ImageNet ones, each in a
  different ImageNet-9 super-class (plus one, "soccer ball", in none).
* ``coco/{train2017,val2017}/<12-digit id>.jpg`` and
  ``coco/annotations/instances_{train,val}2017.json``: polygons for single
  objects, uncompressed RLE for a few ``iscrowd=1`` groups, real COCO ids.
* ``ADEChallengeData2016/{images,annotations}/{training,validation}/``:
  JPEG images and mode-'L' PNG labels, 0 = other/ignore, 1..K classes; the
  class list is ``ADEChallengeData2016/classes.txt`` (line i names label i).
* ``imagenet_c/<corruption>/<1-5>/<wnid>/ILSVRC2012_val_*.JPEG``: 19
  corruptions (see :mod:`ibot.data.corruptions`) of the first val images.
* ``imagenet_a/<wnid>/*.JPEG`` for a subset of classes with small, occluded
  objects in heavy clutter, plus ``README.txt``.
* ``imagenet_9/<variant>/val/<kk>_<name>/*.JPEG`` for the 8 variants of Xiao
  et al. (2020), ``in_to_in9.json`` and ``mixed_sources.json`` (which image
  gave the background of each mixed_* file).

Every set root also holds ``MANIFEST.json`` (parameters + sha256 of every file)
and ``DONE`` (sha256 of the manifest).  A set is built in ``<root>.tmp-<pid>``
and renamed into place, so a root without a valid ``DONE`` is never complete.
Each image has its own seed derived from (seed, set, split, class, index),
so the bytes do not depend on the number of worker processes.

CLI: ``python -m ibot.data.embedded --out DIR --seed 0 [--sets a,b] [--workers 2]
[--size image_size=32 ...]``
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ibot.data.corruptions import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt

__all__ = [
    "SETS",
    "ROOT_NAMES",
    "CLASS_POOL",
    "IN9_CLASSES",
    "IN9_VARIANTS",
    "COCO_CATEGORIES",
    "ADE_CLASSES",
    "EmbeddedSizes",
    "ClassSpec",
    "Layers",
    "generate",
    "imagenet_classes",
    "imagenet_layers",
    "in9_variants",
    "only_bg_t",
    "is_complete",
    "verify",
    "main",
]

SETS: tuple[str, ...] = ("imagenet", "coco", "ade20k", "imagenet_c", "imagenet_a", "imagenet_9")
ROOT_NAMES: dict[str, str] = {
    "imagenet": "imagenet",
    "coco": "coco",
    "ade20k": "ADEChallengeData2016",
    "imagenet_c": "imagenet_c",
    "imagenet_a": "imagenet_a",
    "imagenet_9": "imagenet_9",
}
JPEG_QUALITY = 90
MANIFEST, DONE = "MANIFEST.json", "DONE"


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

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EmbeddedSizes.{field.name} must be a positive int, got {value!r}")
        if self.classes > len(CLASS_POOL):
            raise ValueError(f"EmbeddedSizes.classes must be <= {len(CLASS_POOL)}, got {self.classes}")
        if self.c_per_class > self.val_per_class:
            raise ValueError("EmbeddedSizes.c_per_class must be <= val_per_class")
        if self.a_classes > self.classes:
            raise ValueError("EmbeddedSizes.a_classes must be <= classes")
        for name in ("image_size", "coco_size", "ade_size"):
            if getattr(self, name) < 32:
                raise ValueError(f"EmbeddedSizes.{name} must be >= 32 (ImageNet-C needs it)")


# Which size fields each set depends on (recorded in its manifest).
_SET_FIELDS: dict[str, tuple[str, ...]] = {
    "imagenet": ("classes", "train_per_class", "val_per_class", "image_size"),
    "coco": ("coco_train", "coco_val", "coco_size"),
    "ade20k": ("ade_train", "ade_val", "ade_size"),
    "imagenet_c": ("classes", "val_per_class", "image_size", "c_per_class"),
    "imagenet_a": ("classes", "image_size", "a_classes", "a_per_class"),
    "imagenet_9": ("classes", "val_per_class", "image_size"),
}


# ---------------------------------------------------------------- class tables


@dataclass(frozen=True)
class ClassSpec:
    """Appearance of one ImageNet class: shape family + texture pattern and frequency."""

    wnid: str
    names: str  # as in LOC_synset_mapping.txt
    in9: str | None  # ImageNet-9 super-class, None if in none
    shape: str
    texture: str
    freq: float
    hue: float  # characteristic object hue in [0, 1): classes differ in colour statistics, as real ones do

    @property
    def name(self) -> str:
        return self.names.split(",")[0]


IN9_CLASSES: tuple[str, ...] = (
    "dog",
    "bird",
    "wheeled vehicle",
    "reptile",
    "carnivore",
    "insect",
    "musical instrument",
    "primate",
    "fish",
)
IN9_VARIANTS: tuple[str, ...] = (
    "original",
    "only_fg",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
    "no_fg",
    "only_bg_b",
    "only_bg_t",
)

# Priority order: ``EmbeddedSizes.classes = n`` takes the first n (the 4th has no
# ImageNet-9 super-class so that small test configs exercise the -1 mapping).
CLASS_POOL: tuple[ClassSpec, ...] = (
    ClassSpec("n02085620", "Chihuahua", "dog", "disk", "stripes", 3.0, 0.0),
    ClassSpec("n01530575", "brambling, Fringilla montifringilla", "bird", "triangle", "checker", 2.5, 0.1),
    ClassSpec(
        "n02814533",
        "beach wagon, station wagon, wagon, estate car, beach waggon, station waggon, waggon",
        "wheeled vehicle",
        "square",
        "dots",
        3.0,
        0.2,
    ),
    ClassSpec("n04254680", "soccer ball", None, "star", "rings", 3.0, 0.3),
    ClassSpec("n01675722", "banded gecko", "reptile", "cross", "waves", 3.0, 0.4),
    ClassSpec("n02123045", "tabby, tabby cat", "carnivore", "ellipse", "checker", 4.0, 0.5),
    ClassSpec(
        "n02165456", "ladybug, ladybeetle, lady beetle, ladybird, ladybird beetle", "insect", "hexagon", "stripes",
        5.0, 0.6,
    ),
    ClassSpec("n02787622", "banjo", "musical instrument", "arrow", "rings", 5.0, 0.7),
    ClassSpec("n02480495", "orangutan, orang, orangutang, Pongo pygmaeus", "primate", "ring", "dots", 4.5, 0.8),
    ClassSpec("n01440764", "tench, Tinca tinca", "fish", "crescent", "waves", 5.0, 0.9),
)

# (COCO id, name, supercategory, shape, texture, freq): real COCO ids and names.
COCO_CATEGORIES: tuple[tuple[int, str, str, str, str, float], ...] = (
    (1, "person", "person", "ellipse", "stripes", 3.0),
    (2, "bicycle", "vehicle", "cross", "checker", 3.0),
    (3, "car", "vehicle", "square", "dots", 3.0),
    (16, "bird", "animal", "triangle", "rings", 3.0),
    (17, "cat", "animal", "star", "waves", 3.0),
    (18, "dog", "animal", "disk", "stripes", 5.0),
    (44, "bottle", "kitchen", "hexagon", "checker", 4.5),
    (62, "chair", "furniture", "arrow", "dots", 4.5),
)

# ADE20K-style label ids 1..K (0 = other); stuff first, then things (shape, texture, freq).
ADE_CLASSES: tuple[str, ...] = ("wall", "sky", "floor", "grass", "person", "car", "tree", "lamp", "painting")
_ADE_THINGS: dict[int, tuple[str, str, float]] = {
    5: ("ellipse", "stripes", 3.0),
    6: ("square", "dots", 3.0),
    7: ("star", "waves", 3.0),
    8: ("triangle", "rings", 3.0),
    9: ("hexagon", "checker", 3.0),
}


def imagenet_classes(sizes: EmbeddedSizes) -> list[ClassSpec]:
    """The classification classes for ``sizes``, sorted by wnid (= ImageFolder order)."""
    return sorted(CLASS_POOL[: sizes.classes], key=lambda spec: spec.wnid)


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
_SHAPE_NAMES = tuple(_SHAPES)
_TEXTURES = ("stripes", "checker", "dots", "rings", "waves")


@dataclass(frozen=True)
class _Placement:
    """Where an object lies: centre (x, y) in pixels, radius in pixels, rotation in radians."""

    cx: float
    cy: float
    radius: float
    angle: float


def _place_polygon(unit: np.ndarray, p: _Placement) -> list[float]:
    """Rotate/scale/translate a unit polygon into a flat COCO [x1, y1, x2, y2, ...] list."""
    c, s = np.cos(p.angle), np.sin(p.angle)
    x = p.cx + p.radius * (c * unit[:, 0] - s * unit[:, 1])
    y = p.cy + p.radius * (s * unit[:, 0] + c * unit[:, 1])
    return np.round(np.stack([x, y], axis=1), 2).ravel().tolist()


def _rasterize(polygons: list[list[float]], size: int) -> np.ndarray:
    """Union of polygons as a bool mask, rasterised exactly as pycocotools' annToMask does."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, size, size))
    return mask_utils.decode(rle).astype(bool)


def _shape(shape: str, p: _Placement, size: int) -> tuple[np.ndarray, list[list[float]]]:
    """Mask of a placed shape and the polygons of its filled parts (for COCO)."""
    fills, holes = _SHAPES[shape]
    polygons = [_place_polygon(poly, p) for poly in fills]
    mask = _rasterize(polygons, size)
    if holes:
        mask &= ~_rasterize([_place_polygon(poly, p) for poly in holes], size)
    return mask, polygons


def _texture(kind: str, freq: float, p: _Placement, size: int) -> np.ndarray:
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


def _textured_fill(rng: np.random.Generator, kind: str, freq: float, p: _Placement, size: int,
                   hue: float | None = None) -> np.ndarray:
    """HxWx3 float colour field of a textured object (valid wherever its mask is set): random
    contrasting colours, or the class colours of ``hue``."""
    c1, c2 = _contrasting_colours(rng) if hue is None else _class_colours(rng, hue)
    pattern = _texture(kind, freq, p, size)[..., None]
    return c1 * (1 - pattern) + c2 * pattern


def _random_placement(rng: np.random.Generator, size: int, diameter: tuple[float, float]) -> _Placement:
    """Uniform placement with diameter fraction in ``diameter``, fully inside the image."""
    radius = rng.uniform(*diameter) * size / 2
    cx, cy = rng.uniform(radius, size - radius, 2)
    return _Placement(float(cx), float(cy), float(radius), float(rng.uniform(0, 2 * np.pi)))


# ---------------------------------------------------------------- backgrounds


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    grid = int(rng.integers(2, 7))
    small = Image.fromarray(rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8))
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = ((t - t.min()) / max(np.ptp(t), 1e-9))[..., None]
    return rng.uniform(0, 255, 3) * (1 - t) + rng.uniform(0, 255, 3) * t


def _draw_solid(canvas: np.ndarray, rng: np.random.Generator, count: int, diameter: tuple[float, float]) -> np.ndarray:
    """Paint ``count`` solid shapes from the shared pool; returns the union of their masks."""
    size = canvas.shape[0]
    union = np.zeros((size, size), dtype=bool)
    for _ in range(count):
        shape = _SHAPE_NAMES[int(rng.integers(len(_SHAPE_NAMES)))]
        mask, _ = _shape(shape, _random_placement(rng, size, diameter), size)
        canvas[mask] = rng.uniform(0, 255, 3)
        union |= mask
    return union


def _background(rng: np.random.Generator, size: int, clutter: tuple[int, int]) -> np.ndarray:
    """Varied background: noise/gradient blend + grain + small solid distractors (float HxWx3)."""
    alpha = rng.uniform(0.3, 1.0)
    bg = alpha * _smooth_noise(rng, size) + (1 - alpha) * _gradient(rng, size)
    bg += rng.normal(0, rng.uniform(0, 8), bg.shape)
    _draw_solid(bg, rng, int(rng.integers(clutter[0], clutter[1] + 1)), (0.08, 0.2))
    return bg


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- seeding & io


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """Independent stream per (seed, *keys); strings enter via a stable CRC32."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    return np.random.default_rng(words)


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def _save_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels).save(path, format="PNG")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------- ImageNet


@dataclass(frozen=True)
class Layers:
    """One classification sample: background, object colours and the exact object mask."""

    background: np.ndarray  # HxWx3 uint8
    foreground: np.ndarray  # HxWx3 uint8, meaningful where ``mask``
    mask: np.ndarray  # HxW bool

    @property
    def image(self) -> np.ndarray:
        return np.where(self.mask[..., None], self.foreground, self.background)


def _object_layers(
    rng: np.random.Generator, spec: ClassSpec, size: int, diameter: tuple[float, float], clutter: tuple[int, int],
    background_contrast: float = 1.0,
) -> Layers:
    """Background, textured class object and its mask; ``background_contrast`` < 1 flattens the
    background towards its mean colour."""
    background = _background(rng, size, clutter)
    mean = background.mean(axis=(0, 1), keepdims=True)
    background = mean + background_contrast * (background - mean)
    placement = _random_placement(rng, size, diameter)
    mask, _ = _shape(spec.shape, placement, size)
    foreground = _textured_fill(rng, spec.texture, spec.freq, placement, size, spec.hue)
    return Layers(_to_uint8(background), _to_uint8(foreground), mask)


def imagenet_layers(seed: int, split: str, spec: ClassSpec, index: int, size: int) -> Layers:
    """Layers of image ``index`` of class ``spec`` in ``split`` ('train' or 'val').

    ImageNet-C and ImageNet-9 re-render val images through this, so they use the
    exact pixels and masks of ``imagenet/val``.
    """
    # Object-centric like ImageNet: the object dominates (diameter 65-95%) over a half-contrast
    # background with little clutter.
    return _object_layers(_rng(seed, "imagenet", split, spec.wnid, index), spec, size, (0.65, 0.95), (0, 2),
                          background_contrast=0.5)


def _val_name(classes: list[ClassSpec], spec: ClassSpec, index: int, per_class: int) -> str:
    """Real-style val file name; numbering is 1-based and unique across classes."""
    number = classes.index(spec) * per_class + index + 1
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def _imagenet_file(root: str, seed: int, sizes: EmbeddedSizes, split: str, wnid: str, index: int) -> None:
    classes = imagenet_classes(sizes)
    spec = next(c for c in classes if c.wnid == wnid)
    name = f"{wnid}_{index}.JPEG" if split == "train" else _val_name(classes, spec, index, sizes.val_per_class)
    image = imagenet_layers(seed, split, spec, index, sizes.image_size).image
    _save_jpeg(Path(root) / split / wnid / name, image)


def _build_imagenet(root: Path, seed: int, sizes: EmbeddedSizes, run: _Mapper) -> None:
    classes = imagenet_classes(sizes)
    tasks = [
        (str(root), seed, sizes, split, spec.wnid, i)
        for split, count in (("train", sizes.train_per_class), ("val", sizes.val_per_class))
        for spec in classes
        for i in range(count)
    ]
    list(run(_imagenet_file, tasks))
    _write_text(root / "classes.json", _dump_json({c.wnid: c.name for c in classes}) + "\n")
    _write_text(root / "LOC_synset_mapping.txt", "".join(f"{c.wnid} {c.names}\n" for c in classes))


# ---------------------------------------------------------------- ImageNet-C


def _imagenet_c_files(root: str, seed: int, sizes: EmbeddedSizes, wnid: str, index: int, corruption: str) -> None:
    classes = imagenet_classes(sizes)
    spec = next(c for c in classes if c.wnid == wnid)
    name = _val_name(classes, spec, index, sizes.val_per_class)
    clean = imagenet_layers(seed, "val", spec, index, sizes.image_size).image
    for severity in range(1, 6):
        rng = _rng(seed, "imagenet_c", corruption, severity, wnid, index)
        _save_jpeg(Path(root) / corruption / str(severity) / wnid / name, corrupt(clean, corruption, severity, rng))


def _build_imagenet_c(root: Path, seed: int, sizes: EmbeddedSizes, run: _Mapper) -> None:
    tasks = [
        (str(root), seed, sizes, spec.wnid, i, corruption)
        for spec in imagenet_classes(sizes)
        for i in range(sizes.c_per_class)
        for corruption in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
    ]
    list(run(_imagenet_c_files, tasks))


# ---------------------------------------------------------------- ImageNet-A


def _imagenet_a_file(root: str, seed: int, sizes: EmbeddedSizes, wnid: str, index: int) -> None:
    """Hard sample: small object, heavy clutter (incl. textured decoys), partial occlusion."""
    spec = next(c for c in CLASS_POOL if c.wnid == wnid)
    size = sizes.image_size
    rng = _rng(seed, "imagenet_a", wnid, index)
    layers = _object_layers(rng, spec, size, (0.2, 0.35), (6, 12))
    image = layers.image.astype(np.float64)
    for _ in range(int(rng.integers(1, 4))):  # textured decoys of the shared pool
        p = _random_placement(rng, size, (0.1, 0.25))
        mask, _ = _shape(_SHAPE_NAMES[int(rng.integers(len(_SHAPE_NAMES)))], p, size)
        fill = _textured_fill(rng, _TEXTURES[int(rng.integers(len(_TEXTURES)))], float(rng.uniform(2, 6)), p, size)
        image[mask & ~layers.mask] = fill[mask & ~layers.mask]
    ys, xs = np.nonzero(layers.mask)
    object_radius = np.sqrt(len(ys) / np.pi)
    for _ in range(int(rng.integers(1, 3))):  # occluders centred on the object: partial occlusion
        j = int(rng.integers(len(ys)))
        p = _Placement(
            xs[j] + 0.5, ys[j] + 0.5, float(rng.uniform(0.3, 0.5) * object_radius), float(rng.uniform(0, 2 * np.pi))
        )
        mask, _ = _shape(_SHAPE_NAMES[int(rng.integers(len(_SHAPE_NAMES)))], p, size)
        image[mask] = rng.uniform(0, 255, 3)
    _save_jpeg(Path(root) / wnid / f"{wnid}_a_{index:04d}.JPEG", _to_uint8(image))


def _build_imagenet_a(root: Path, seed: int, sizes: EmbeddedSizes, run: _Mapper) -> None:
    wnids = [spec.wnid for spec in imagenet_classes(sizes)[: sizes.a_classes]]
    list(run(_imagenet_a_file, [(str(root), seed, sizes, w, i) for w in wnids for i in range(sizes.a_per_class)]))
    _write_text(
        root / "README.txt",
        "Embedded ImageNet-A-style set written by ibot.data.embedded; NOT the real ImageNet-A\n"
        "(Hendrycks et al., 2021). Synthetic hard examples (small objects, heavy clutter,\n"
        "partial occlusion) for the classes present as folders: " + ", ".join(wnids) + ".\n"
        "Restrict a classifier's logits to these wnids, as for the real ImageNet-A.\n",
    )


# ---------------------------------------------------------------- ImageNet-9


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (y0, y1, x0, x1) half-open box of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def only_bg_t(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill the object's bbox by tiling the largest background strip outside it (Only-BG-T)."""
    y0, y1, x0, x1 = _bbox(mask)
    strips = [image[:y0], image[y1:], image[:, :x0], image[:, x1:]]
    strip = max(strips, key=lambda s: s.shape[0] * s.shape[1])
    out = image.copy()
    if strip.size == 0:
        out[y0:y1, x0:x1] = 0
        return out
    reps = (-(-(y1 - y0) // strip.shape[0]), -(-(x1 - x0) // strip.shape[1]), 1)
    out[y0:y1, x0:x1] = np.tile(strip, reps)[: y1 - y0, : x1 - x0]
    return out


def in9_variants(layers: Layers, same: Layers, rand: Layers, nxt: Layers) -> dict[str, np.ndarray]:
    """The 8 ImageNet-9 variants of one sample (Xiao et al., 2020), from exact masks.

    ``same``/``rand``/``nxt`` give the backgrounds (their Only-BG-T versions) for
    mixed_same / mixed_rand / mixed_next.
    """
    image, mask = layers.image, layers.mask[..., None]
    y0, y1, x0, x1 = _bbox(layers.mask)
    only_bg_b = image.copy()
    only_bg_b[y0:y1, x0:x1] = 0

    def mixed(other: Layers) -> np.ndarray:
        return np.where(mask, layers.foreground, only_bg_t(other.image, other.mask))

    return {
        "original": image,
        "only_fg": np.where(mask, layers.foreground, 0).astype(np.uint8),
        "mixed_same": mixed(same),
        "mixed_rand": mixed(rand),
        "mixed_next": mixed(nxt),
        "no_fg": np.where(mask, 0, image).astype(np.uint8),
        "only_bg_b": only_bg_b,
        "only_bg_t": only_bg_t(image, layers.mask),
    }


def _in9_members(sizes: EmbeddedSizes) -> list[tuple[int, ClassSpec]]:
    """(ImageNet-9 index, class) for our classes inside a super-class, by IN-9 index."""
    return sorted(
        ((IN9_CLASSES.index(c.in9), c) for c in imagenet_classes(sizes) if c.in9 is not None), key=lambda m: m[0]
    )


def _in9_folder(k: int) -> str:
    return f"{k:02d}_{IN9_CLASSES[k]}"


def _imagenet_9_files(root: str, seed: int, sizes: EmbeddedSizes, wnid: str, index: int) -> dict[str, str]:
    """Write the 8 variants of one val image; returns {mixed variant: source original path}."""
    classes = imagenet_classes(sizes)
    members = _in9_members(sizes)
    position = next(i for i, (_, c) in enumerate(members) if c.wnid == wnid)
    k, spec = members[position]
    rng = _rng(seed, "imagenet_9", wnid, index)
    n = sizes.val_per_class
    others = [i for i in range(n) if i != index] or [index]
    picks = {
        "mixed_same": (spec, int(rng.choice(others))),
        "mixed_rand": (members[int(rng.integers(len(members)))][1], int(rng.integers(n))),
        "mixed_next": (members[(position + 1) % len(members)][1], int(rng.integers(n))),
    }
    size = sizes.image_size
    sources = {v: imagenet_layers(seed, "val", s, i, size) for v, (s, i) in picks.items()}
    layers = imagenet_layers(seed, "val", spec, index, size)
    variants = in9_variants(layers, sources["mixed_same"], sources["mixed_rand"], sources["mixed_next"])
    name = _val_name(classes, spec, index, n)
    for variant, image in variants.items():
        _save_jpeg(Path(root) / variant / "val" / _in9_folder(k) / name, image)
    return {
        v: f"original/val/{_in9_folder(IN9_CLASSES.index(s.in9))}/{_val_name(classes, s, i, n)}"
        for v, (s, i) in picks.items()
    }


def _build_imagenet_9(root: Path, seed: int, sizes: EmbeddedSizes, run: _Mapper) -> None:
    members = _in9_members(sizes)
    if not members:
        raise ValueError("imagenet_9 needs at least one class inside an ImageNet-9 super-class")
    classes = imagenet_classes(sizes)
    tasks = [(str(root), seed, sizes, spec.wnid, i) for _, spec in members for i in range(sizes.val_per_class)]
    sources: dict[str, dict[str, str]] = {v: {} for v in ("mixed_same", "mixed_rand", "mixed_next")}
    for (_, _, _, wnid, i), picked in zip(tasks, run(_imagenet_9_files, tasks), strict=True):
        k, spec = next((k, c) for k, c in members if c.wnid == wnid)
        name = _val_name(classes, spec, i, sizes.val_per_class)
        for variant, source in picked.items():
            sources[variant][f"{variant}/val/{_in9_folder(k)}/{name}"] = source
    mapping = {str(i): (IN9_CLASSES.index(c.in9) if c.in9 else -1) for i, c in enumerate(classes)}
    _write_text(root / "in_to_in9.json", _dump_json(mapping) + "\n")
    _write_text(root / "mixed_sources.json", _dump_json(sources) + "\n")


# ---------------------------------------------------------------- COCO


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with a run of zeros)."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def _polygon_bbox(polygons: list[list[float]]) -> list[float]:
    xy = np.concatenate([np.reshape(p, (-1, 2)) for p in polygons])
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    return [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]


def _mask_bbox(mask: np.ndarray) -> list[float]:
    y0, y1, x0, x1 = _bbox(mask)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _coco_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Image + annotations (no ids yet) with 1-4 non-overlapping objects; every 5th image
    also gets one iscrowd=1 group of small same-category objects."""
    rng = _rng(seed, "coco", split, index)
    canvas = _background(rng, size, (0, 3))
    occupied = np.zeros((size, size), dtype=bool)
    anns: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, 5))):
        cat_id, _, _, shape, texture, freq = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))]
        for _attempt in range(20):
            p = _random_placement(rng, size, (0.16, 0.44))
            mask, polygons = _shape(shape, p, size)
            if mask.any() and not (mask & occupied).any():
                break
        else:
            continue
        canvas[mask] = _textured_fill(rng, texture, freq, p, size)[mask]
        occupied |= mask
        anns.append(
            {
                "category_id": cat_id,
                "iscrowd": 0,
                "segmentation": polygons,
                "bbox": _polygon_bbox(polygons),
                "area": float(mask.sum()),
            }
        )
    if index % 5 == 0:
        crowd = _coco_crowd(rng, canvas, occupied)
        if crowd is not None:
            anns.append(crowd)
    return _to_uint8(canvas), anns


def _coco_crowd(rng: np.random.Generator, canvas: np.ndarray, occupied: np.ndarray) -> dict[str, Any] | None:
    """Paint a cluster of small objects of one category into free space; annotate as a crowd."""
    size = canvas.shape[0]
    cat_id, _, _, shape, texture, freq = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))]
    cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
    union = np.zeros_like(occupied)
    for _ in range(int(rng.integers(5, 9))):
        radius = rng.uniform(0.03, 0.05) * size
        ox, oy = np.clip(np.array([cx, cy]) + rng.normal(0, 0.08 * size, 2), radius, size - radius)
        p = _Placement(float(ox), float(oy), float(radius), float(rng.uniform(0, 2 * np.pi)))
        mask = _shape(shape, p, size)[0] & ~occupied
        canvas[mask] = _textured_fill(rng, texture, freq, p, size)[mask]
        union |= mask
    if not union.any():
        return None
    occupied |= union
    return {
        "category_id": cat_id,
        "iscrowd": 1,
        "segmentation": {"counts": _rle_counts(union), "size": [size, size]},
        "bbox": _mask_bbox(union),
        "area": float(union.sum()),
    }


def _coco_file(
    root: str, seed: int, sizes: EmbeddedSizes, split: str, index: int, image_id: int
) -> list[dict[str, Any]]:
    image, anns = _coco_sample(seed, split, index, sizes.coco_size)
    _save_jpeg(Path(root) / f"{split}2017" / f"{image_id:012d}.jpg", image)
    return anns


def _coco_image_id(split: str, index: int) -> int:
    """Unique across splits, like real COCO ids."""
    return (1 if split == "train" else 500001) + index


def _build_coco(root: Path, seed: int, sizes: EmbeddedSizes, run: _Mapper) -> None:
    categories = [{"id": c[0], "name": c[1], "supercategory": c[2]} for c in COCO_CATEGORIES]
    next_ann_id = 1
    for split, count in (("train", sizes.coco_train), ("val", sizes.coco_val)):
        tasks = [(str(root), seed, sizes, split, i, _coco_image_id(split, i)) for i in range(count)]
        images, annotations = [], []
        for task, anns in zip(tasks, run(_coco_file, tasks), strict=True):
            image_id = task[-1]
            images.append(
                {
                    "id": image_id,
                    "file_name": f"{image_id:012d}.jpg",
                    "width": sizes.coco_size,
                    "height": sizes.coco_size,
                    "license": 1,
                    "coco_url": "",
                    "flickr_url": "",
                    "date_captured": "2017-01-01 00:00:00",
                }
            )
            for ann in anns:
                annotations.append({**ann, "id": next_ann_id, "image_id": image_id})
                next_ann_id += 1
        dataset = {
            "info": {
                "description": "Embedded synthetic COCO-format data (ibot.data.embedded), not real COCO",
                "url": "",
                "version": "1.0",
                "year": 2017,
                "contributor": "ibot-repro",
                "date_created": "2017/01/01",
            },
            "licenses": [{"id": 1, "name": "synthetic, no restrictions", "url": ""}],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        _write_text(root / "annotations" / f"instances_{split}2017.json", _dump_json(dataset))


# ---------------------------------------------------------------- ADE20K


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
        clouds = np.clip((_smooth_noise(rng, size).mean(-1, keepdims=True) - 150) / 60, 0, 1)
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
    rng = _rng(seed, "ade20k", split, index)
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
        p = _random_placement(rng, size, (0.2, 0.45))
        mask, _ = _shape(shape, p, size)
        image[mask] = _textured_fill(rng, texture, freq, p, size)[mask]
        labels[mask] = label
    other = _draw_solid(image, rng, int(rng.integers(0, 4)), (0.06, 0.15))
    labels[other] = 0
    return _to_uint8(image), labels


def _ade_file(root: str, seed: int, sizes: EmbeddedSizes, split: str, index: int) -> None:
    folder, prefix = ("training", "train") if split == "train" else ("validation", "val")
    image, labels = _ade_sample(seed, split, index, sizes.ade_size)
    stem = f"ADE_{prefix}_{index + 1:08d}"
    _save_jpeg(Path(root) / "images" / folder / f"{stem}.jpg", image)
    _save_png(Path(root) / "annotations" / folder / f"{stem}.png", labels)


def _build_ade20k(root: Path, seed: int, sizes: EmbeddedSizes, run: _Mapper) -> None:
    tasks = [
        (str(root), seed, sizes, split, i)
        for split, n in (("train", sizes.ade_train), ("val", sizes.ade_val))
        for i in range(n)
    ]
    list(run(_ade_file, tasks))
    _write_text(root / "classes.txt", "".join(f"{name}\n" for name in ADE_CLASSES))


# ---------------------------------------------------------------- manifest & atomic build

_Mapper = Callable[[Callable[..., Any], Sequence[tuple[Any, ...]]], Iterable[Any]]
_BUILDERS: dict[str, Callable[[Path, int, EmbeddedSizes, _Mapper], None]] = {
    "imagenet": _build_imagenet,
    "coco": _build_coco,
    "ade20k": _build_ade20k,
    "imagenet_c": _build_imagenet_c,
    "imagenet_a": _build_imagenet_a,
    "imagenet_9": _build_imagenet_9,
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _params(name: str, seed: int, sizes: EmbeddedSizes) -> dict[str, Any]:
    return {"dataset": name, "seed": seed, "sizes": {f: getattr(sizes, f) for f in _SET_FIELDS[name]}, "version": 1}


def _write_manifest(root: Path, params: dict[str, Any]) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    manifest = {**params, "files": {p.relative_to(root).as_posix(): _sha256(p) for p in files}}
    (root / MANIFEST).write_text(_dump_json(manifest) + "\n", encoding="utf-8")
    (root / DONE).write_text(_sha256(root / MANIFEST) + "\n", encoding="utf-8")


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest if ``DONE`` vouches for it, else None."""
    try:
        done = (root / DONE).read_text(encoding="utf-8").strip()
        if done != _sha256(root / MANIFEST):
            return None
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(root: str | Path) -> bool:
    """True iff ``root`` is a finished embedded set (valid ``DONE`` marker); cheap."""
    return _read_manifest(Path(root)) is not None


def verify(root: str | Path) -> None:
    """Check every file of a finished set against its manifest; raises ValueError on mismatch."""
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest is None:
        raise ValueError(f"{root}: no valid {DONE} marker; the dataset is incomplete")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST, DONE}
    expected = manifest["files"]
    problems = sorted(set(expected) ^ on_disk) + sorted(
        f for f in expected if f in on_disk and _sha256(root / f) != expected[f]
    )
    if problems:
        raise ValueError(f"{root}: {len(problems)} files missing, extra or modified, e.g. {problems[:5]}")


def _materialise(name: str, out_dir: Path, seed: int, sizes: EmbeddedSizes, run: _Mapper) -> Path:
    """Build one set atomically, or reuse an existing complete one with the same parameters."""
    final = out_dir / ROOT_NAMES[name]
    params = _params(name, seed, sizes)
    if final.exists():
        _check_reusable(final, params)
        return final
    tmp = out_dir / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _BUILDERS[name](tmp, seed, sizes, run)
        _write_manifest(tmp, params)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        _check_reusable(final, params)  # a concurrent run finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_reusable(final: Path, params: dict[str, Any]) -> None:
    manifest = _read_manifest(final)
    if manifest is None:
        raise FileExistsError(
            f"{final} exists but has no valid {DONE} marker (incomplete, or not written by "
            "ibot.data.embedded); remove it to regenerate"
        )
    old = {k: manifest.get(k) for k in params}
    if old != params:
        raise FileExistsError(f"{final} was generated with {old}, but {params} was requested; remove it to regenerate")


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[_Mapper]:
    """Ordered map of a task function over argument tuples, in-process or on a pool."""
    if workers <= 1:
        yield lambda fn, tasks: (fn(*task) for task in tasks)
        return
    with multiprocessing.Pool(workers) as pool:
        yield lambda fn, tasks: pool.starmap(fn, tasks, chunksize=max(1, len(tasks) // (8 * workers)))


def generate(
    out_dir: str | Path,
    seed: int = 0,
    sets: Sequence[str] | None = None,
    sizes: EmbeddedSizes | None = None,
    *,
    workers: int = 1,
) -> dict[str, Path]:
    """Write the requested sets (default: all of ``SETS``) under ``out_dir``.

    Returns the root of each set.  Existing complete sets with the same seed and
    sizes are reused; conflicting ones raise FileExistsError.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    sets = list(SETS if sets is None else sets)
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise ValueError(f"unknown sets {unknown}; choose from {list(SETS)}")
    sizes = sizes or EmbeddedSizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _mapper(workers) as run:
        return {name: _materialise(name, out, seed, sizes, run) for name in sets}


def _parse_size(item: str) -> tuple[str, int]:
    key, sep, value = item.partition("=")
    if not sep or key not in {f.name for f in dataclasses.fields(EmbeddedSizes)}:
        raise argparse.ArgumentTypeError(f"expected FIELD=INT with FIELD in EmbeddedSizes, got {item!r}")
    return key, int(value)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints {set: root} as JSON."""
    parser = argparse.ArgumentParser(prog="python -m ibot.data.embedded", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    parser.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    parser.add_argument(
        "--size",
        type=_parse_size,
        action="append",
        default=[],
        metavar="FIELD=INT",
        help="override an EmbeddedSizes field",
    )
    args = parser.parse_args(argv)
    sizes = EmbeddedSizes(**dict(args.size))
    roots = generate(args.out, args.seed, [s for s in args.sets.split(",") if s], sizes, workers=args.workers)
    json.dump({k: str(v) for k, v in roots.items()}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
