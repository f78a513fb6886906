"""Embedded COCO 2017: ``coco/{train2017,val2017}/<12-digit id>.jpg`` and
``coco/annotations/instances_{train,val}2017.json``.

Sized for the embedded detection stage, which trains Cascade Mask R-CNN for only ~100 iterations on
CPU: 1-2 large objects per image (diameter 45-60% of the image) of 3 categories that differ in
shape and texture (square/dots, disk/stripes, hexagon/checker), on a low-contrast smooth background
without distractor shapes. Objects use random contrasting colours (detection must not key on a
class hue). Polygons for single objects, uncompressed RLE for a few ``iscrowd=1`` groups of small
same-category objects, real COCO category ids and names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.render import (Placement, background, dump_json, place_shape, random_placement, save_jpeg,
                                       seeded_rng, textured_fill, tight_box, to_uint8, write_text)

__all__ = ["BUILDER", "COCO_CATEGORIES"]

# (COCO id, name, supercategory, shape, texture, freq): real COCO ids and names.
COCO_CATEGORIES: tuple[tuple[int, str, str, str, str, float], ...] = (
    (3, "car", "vehicle", "square", "dots", 3.0),
    (18, "dog", "animal", "disk", "stripes", 3.0),
    (44, "bottle", "kitchen", "hexagon", "checker", 3.0),
)
#: Objects per image (inclusive range; a placement that finds no free space after 20 tries is dropped).
OBJECTS = (1, 2)
#: Object diameter as a fraction of the image side.
DIAMETER = (0.45, 0.6)
#: Background: no distractor shapes, contrast scaled towards its mean colour (objects stand out).
CLUTTER = (0, 0)
BACKGROUND_CONTRAST = 0.3
#: Every CROWD_EVERY-th image also gets one iscrowd=1 group.
CROWD_EVERY = 5


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
    y0, y1, x0, x1 = tight_box(mask)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _coco_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Image + annotations (no ids yet) with ``OBJECTS`` non-overlapping large objects; every
    ``CROWD_EVERY``-th image also gets one iscrowd=1 group of small same-category objects."""
    rng = seeded_rng(seed, "coco", split, index)
    canvas = background(rng, size, CLUTTER)
    mean = canvas.mean(axis=(0, 1), keepdims=True)
    canvas = mean + BACKGROUND_CONTRAST * (canvas - mean)
    occupied = np.zeros((size, size), dtype=bool)
    anns: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))):
        cat_id, _, _, shape, texture, freq = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))]
        for _attempt in range(20):
            p = random_placement(rng, size, DIAMETER)
            mask, polygons = place_shape(shape, p, size)
            if mask.any() and not (mask & occupied).any():
                break
        else:
            continue
        canvas[mask] = textured_fill(rng, texture, freq, p, size)[mask]
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
    if index % CROWD_EVERY == 0:
        crowd = _coco_crowd(rng, canvas, occupied)
        if crowd is not None:
            anns.append(crowd)
    return to_uint8(canvas), anns


def _coco_crowd(rng: np.random.Generator, canvas: np.ndarray, occupied: np.ndarray) -> dict[str, Any] | None:
    """Paint a cluster of small objects of one category into free space; annotate as a crowd."""
    size = canvas.shape[0]
    cat_id, _, _, shape, texture, freq = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))]
    cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
    union = np.zeros_like(occupied)
    for _ in range(int(rng.integers(5, 9))):
        radius = rng.uniform(0.03, 0.05) * size
        ox, oy = np.clip(np.array([cx, cy]) + rng.normal(0, 0.08 * size, 2), radius, size - radius)
        p = Placement(float(ox), float(oy), float(radius), float(rng.uniform(0, 2 * np.pi)))
        mask = place_shape(shape, p, size)[0] & ~occupied
        canvas[mask] = textured_fill(rng, texture, freq, p, size)[mask]
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
    save_jpeg(Path(root) / f"{split}2017" / f"{image_id:012d}.jpg", image)
    return anns


def _coco_image_id(split: str, index: int) -> int:
    """Unique across splits, like real COCO ids."""
    return (1 if split == "train" else 500001) + index


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
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
        write_text(root / "annotations" / f"instances_{split}2017.json", dump_json(dataset))


BUILDER = SetBuilder(("coco_train", "coco_val", "coco_size"), _build)
