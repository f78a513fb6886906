"""ImageNet-9 / backgrounds challenge (Xiao et al., ICLR 2021): its super-classes and variants.

One source for the embedded generator (:mod:`ibot.data.embedded.imagenet_9`), the layout check
(:mod:`ibot.data.layouts`) and the evaluation stage (:mod:`downstream.robustness.bg_challenge`).
Class folders are named ``<k:02d>_<name>`` with ``k`` the index in :data:`IN9_CLASSES`.
"""

from __future__ import annotations

__all__ = ["IN9_CLASSES", "IN9_VARIANTS"]

#: The 9 super-classes, in label order.
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
#: The 8 test variants (folder names under the dataset root).
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
