"""Embedded backgrounds challenge: ``imagenet_9/<variant>/val/<kk>_<name>/*.JPEG``.

The 8 variants of Xiao et al. (2021) (:data:`ibot.data.imagenet9.IN9_VARIANTS`) of the val images of
the classes inside an ImageNet-9 super-class, composed from the exact object masks; plus
``in_to_in9.json`` (head class index -> IN-9 index or -1) and ``mixed_sources.json`` (which image
gave the background of each mixed_* file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.classes import ClassSpec
from ibot.data.embedded.imagenet import imagenet_classes, imagenet_layers, val_name
from ibot.data.embedded.render import Layers, dump_json, save_jpeg, seeded_rng, tight_box, write_text
from ibot.data.imagenet9 import IN9_CLASSES, IN9_VARIANTS

__all__ = ["BUILDER", "only_bg_t", "in9_variants"]

_MIXED = ("mixed_same", "mixed_rand", "mixed_next")


def only_bg_t(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill the object's bbox by tiling the largest background strip outside it (Only-BG-T)."""
    y0, y1, x0, x1 = tight_box(mask)
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
    y0, y1, x0, x1 = tight_box(layers.mask)
    only_bg_b = image.copy()
    only_bg_b[y0:y1, x0:x1] = 0

    def mixed(other: Layers) -> np.ndarray:
        return np.where(mask, layers.foreground, only_bg_t(other.image, other.mask))

    variants = {
        "original": image,
        "only_fg": np.where(mask, layers.foreground, 0).astype(np.uint8),
        "mixed_same": mixed(same),
        "mixed_rand": mixed(rand),
        "mixed_next": mixed(nxt),
        "no_fg": np.where(mask, 0, image).astype(np.uint8),
        "only_bg_b": only_bg_b,
        "only_bg_t": only_bg_t(image, layers.mask),
    }
    return {name: variants[name] for name in IN9_VARIANTS}


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
    rng = seeded_rng(seed, "imagenet_9", wnid, index)
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
    name = val_name(classes, spec, index, n)
    for variant, image in variants.items():
        save_jpeg(Path(root) / variant / "val" / _in9_folder(k) / name, image)
    return {
        v: f"original/val/{_in9_folder(IN9_CLASSES.index(s.in9))}/{val_name(classes, s, i, n)}"
        for v, (s, i) in picks.items()
    }


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    members = _in9_members(sizes)
    if not members:
        raise ValueError("imagenet_9 needs at least one class inside an ImageNet-9 super-class")
    classes = imagenet_classes(sizes)
    tasks = [(str(root), seed, sizes, spec.wnid, i) for _, spec in members for i in range(sizes.val_per_class)]
    sources: dict[str, dict[str, str]] = {v: {} for v in _MIXED}
    for (_, _, _, wnid, i), picked in zip(tasks, run(_imagenet_9_files, tasks), strict=True):
        k, spec = next((k, c) for k, c in members if c.wnid == wnid)
        name = val_name(classes, spec, i, sizes.val_per_class)
        for variant, source in picked.items():
            sources[variant][f"{variant}/val/{_in9_folder(k)}/{name}"] = source
    mapping = {str(i): (IN9_CLASSES.index(c.in9) if c.in9 else -1) for i, c in enumerate(classes)}
    write_text(root / "in_to_in9.json", dump_json(mapping) + "\n")
    write_text(root / "mixed_sources.json", dump_json(sources) + "\n")


BUILDER = SetBuilder(("classes", "val_per_class", "image_size"), _build)
