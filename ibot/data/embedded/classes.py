"""The embedded ImageNet classes: real wnids, each drawn as its own shape, texture and hue.

``EmbeddedSizes.classes = n`` takes the first n of :data:`CLASS_POOL` (priority order; the 4th
has no ImageNet-9 super-class so that small test configs exercise the -1 mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClassSpec", "CLASS_POOL"]


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
