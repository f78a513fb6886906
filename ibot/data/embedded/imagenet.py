"""Embedded ImageNet: ``imagenet/{train,val}/<wnid>/*.JPEG`` plus ``classes.json``,
``LOC_synset_mapping.txt`` and the semi-supervised label subsets ``imagenet_subsets/{1,10}percent.txt``
(SimCLR's file format, one train file name per line; see :mod:`ibot.data.subsets`).

The wnids are real ImageNet ones, each in a different ImageNet-9 super-class (plus one, "soccer
ball", in none). Val files are named like the real ones (``ILSVRC2012_val_<n>.JPEG``).
ImageNet-C and ImageNet-9 re-render val images through :func:`imagenet_layers`.
"""

from __future__ import annotations

from pathlib import Path

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.classes import CLASS_POOL, ClassSpec
from ibot.data.subsets import SUBSET_DIR, SUBSET_FILE_NAMES
from ibot.data.embedded.render import Layers, dump_json, object_layers, save_jpeg, seeded_rng, write_text

__all__ = ["BUILDER", "SUBSET_PERCENTS", "imagenet_classes", "imagenet_layers", "val_name", "subset_names"]

#: The label subsets written, in percent of each class's train images (the paper's 1% and 10%).
SUBSET_PERCENTS = (1, 10)


def imagenet_classes(sizes: EmbeddedSizes) -> list[ClassSpec]:
    """The classification classes for ``sizes``, sorted by wnid (= ImageFolder order)."""
    return sorted(CLASS_POOL[: sizes.classes], key=lambda spec: spec.wnid)


def imagenet_layers(seed: int, split: str, spec: ClassSpec, index: int, size: int) -> Layers:
    """Layers of image ``index`` of class ``spec`` in ``split`` ('train' or 'val').

    ImageNet-C and ImageNet-9 re-render val images through this, so they use the
    exact pixels and masks of ``imagenet/val``.
    """
    # Object-centric like ImageNet: the object dominates (diameter 65-95%) over a half-contrast
    # background with little clutter.
    return object_layers(seeded_rng(seed, "imagenet", split, spec.wnid, index), spec, size, (0.65, 0.95), (0, 2),
                         background_contrast=0.5)


def val_name(classes: list[ClassSpec], spec: ClassSpec, index: int, per_class: int) -> str:
    """Real-style val file name; numbering is 1-based and unique across classes."""
    number = classes.index(spec) * per_class + index + 1
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def subset_names(seed: int, sizes: EmbeddedSizes, percent: int) -> list[str]:
    """Train file names of the ``percent``% subset: per class, the first ``max(1, round(percent% of
    train_per_class))`` images of a seeded permutation (so each class has at least one labelled image,
    and the 1% subset is contained in the 10% one, both in class order)."""
    names = []
    for spec in imagenet_classes(sizes):
        count = max(1, round(sizes.train_per_class * percent / 100))
        order = seeded_rng(seed, "imagenet_subsets", spec.wnid).permutation(sizes.train_per_class)
        names += [f"{spec.wnid}_{int(i)}.JPEG" for i in sorted(order[:count])]
    return names


def _imagenet_file(root: str, seed: int, sizes: EmbeddedSizes, split: str, wnid: str, index: int) -> None:
    classes = imagenet_classes(sizes)
    spec = next(c for c in classes if c.wnid == wnid)
    name = f"{wnid}_{index}.JPEG" if split == "train" else val_name(classes, spec, index, sizes.val_per_class)
    image = imagenet_layers(seed, split, spec, index, sizes.image_size).image
    save_jpeg(Path(root) / split / wnid / name, image)


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    classes = imagenet_classes(sizes)
    tasks = [
        (str(root), seed, sizes, split, spec.wnid, i)
        for split, count in (("train", sizes.train_per_class), ("val", sizes.val_per_class))
        for spec in classes
        for i in range(count)
    ]
    list(run(_imagenet_file, tasks))
    write_text(root / "classes.json", dump_json({c.wnid: c.name for c in classes}) + "\n")
    write_text(root / "LOC_synset_mapping.txt", "".join(f"{c.wnid} {c.names}\n" for c in classes))
    for percent in SUBSET_PERCENTS:
        write_text(root / SUBSET_DIR / SUBSET_FILE_NAMES[str(percent)],
                   "".join(f"{name}\n" for name in subset_names(seed, sizes, percent)))


BUILDER = SetBuilder(("classes", "train_per_class", "val_per_class", "image_size"), _build)
