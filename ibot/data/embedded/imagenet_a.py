"""Embedded ImageNet-A-style set: ``imagenet_a/<wnid>/*.JPEG`` plus ``README.txt``.

For the first ``a_classes`` classes: small objects in heavy clutter (textured decoys of the shared
shape pool) and partially occluded. Not the real ImageNet-A; the README says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.classes import CLASS_POOL
from ibot.data.embedded.imagenet import imagenet_classes
from ibot.data.embedded.render import (SHAPE_NAMES, TEXTURES, Placement, object_layers, place_shape,
                                       random_placement, save_jpeg, seeded_rng, textured_fill, to_uint8, write_text)

__all__ = ["BUILDER"]


def _imagenet_a_file(root: str, seed: int, sizes: EmbeddedSizes, wnid: str, index: int) -> None:
    """Hard sample: small object, heavy clutter (incl. textured decoys), partial occlusion."""
    spec = next(c for c in CLASS_POOL if c.wnid == wnid)
    size = sizes.image_size
    rng = seeded_rng(seed, "imagenet_a", wnid, index)
    layers = object_layers(rng, spec, size, (0.2, 0.35), (6, 12))
    image = layers.image.astype(np.float64)
    for _ in range(int(rng.integers(1, 4))):  # textured decoys of the shared pool
        p = random_placement(rng, size, (0.1, 0.25))
        mask, _ = place_shape(SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))], p, size)
        fill = textured_fill(rng, TEXTURES[int(rng.integers(len(TEXTURES)))], float(rng.uniform(2, 6)), p, size)
        image[mask & ~layers.mask] = fill[mask & ~layers.mask]
    ys, xs = np.nonzero(layers.mask)
    object_radius = np.sqrt(len(ys) / np.pi)
    for _ in range(int(rng.integers(1, 3))):  # occluders centred on the object: partial occlusion
        j = int(rng.integers(len(ys)))
        p = Placement(
            xs[j] + 0.5, ys[j] + 0.5, float(rng.uniform(0.3, 0.5) * object_radius), float(rng.uniform(0, 2 * np.pi))
        )
        mask, _ = place_shape(SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))], p, size)
        image[mask] = rng.uniform(0, 255, 3)
    save_jpeg(Path(root) / wnid / f"{wnid}_a_{index:04d}.JPEG", to_uint8(image))


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    wnids = [spec.wnid for spec in imagenet_classes(sizes)[: sizes.a_classes]]
    list(run(_imagenet_a_file, [(str(root), seed, sizes, w, i) for w in wnids for i in range(sizes.a_per_class)]))
    write_text(
        root / "README.txt",
        "Embedded ImageNet-A-style set written by ibot.data.embedded; NOT the real ImageNet-A\n"
        "(Hendrycks et al., 2021). Synthetic hard examples (small objects, heavy clutter,\n"
        "partial occlusion) for the classes present as folders: " + ", ".join(wnids) + ".\n"
        "Restrict a classifier's logits to these wnids, as for the real ImageNet-A.\n",
    )


BUILDER = SetBuilder(("classes", "image_size", "a_classes", "a_per_class"), _build)
