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

One module per set, each documenting its layout (relative to ``--out``; the folder is the kind's
``embedded_root`` in :data:`ibot.data.kinds.DATASET_KINDS`): :mod:`.imagenet`, :mod:`.coco`,
:mod:`.ade20k`, :mod:`.imagenet_c`, :mod:`.imagenet_a`, :mod:`.imagenet_9`. Shared drawing code is
in :mod:`.render`, the class table in :mod:`.classes`, sizes and the builder contract in
:mod:`.base`, the manifest / ``DONE`` marker / atomic build in :mod:`.manifest`, the registry and
:func:`generate` in :mod:`.sets`, the CLI in :mod:`.cli`.

Every set root also holds ``MANIFEST.json`` (parameters + sha256 of every file)
and ``DONE`` (sha256 of the manifest).  A set is built in ``<root>.tmp-<pid>``
and renamed into place, so a root without a valid ``DONE`` is never complete.
Each image has its own seed derived from (seed, set, split, class, index),
so the bytes do not depend on the number of worker processes.

CLI: ``python -m ibot.data.embedded --out DIR --seed 0 [--sets a,b] [--workers 2]
[--size image_size=32 ...]``
"""

from __future__ import annotations

from ibot.data.embedded.ade20k import ADE_CLASSES
from ibot.data.embedded.base import EmbeddedSizes, SetBuilder
from ibot.data.embedded.classes import CLASS_POOL, ClassSpec
from ibot.data.embedded.cli import main
from ibot.data.embedded.coco import COCO_CATEGORIES
from ibot.data.embedded.imagenet import imagenet_classes, imagenet_layers
from ibot.data.embedded.imagenet_9 import in9_variants, only_bg_t
from ibot.data.embedded.manifest import DONE, MANIFEST, is_complete, verify
from ibot.data.embedded.render import JPEG_QUALITY, Layers
from ibot.data.embedded.sets import BUILDERS, ROOT_NAMES, SETS, generate
from ibot.data.imagenet9 import IN9_CLASSES, IN9_VARIANTS

__all__ = [
    "SETS",
    "ROOT_NAMES",
    "BUILDERS",
    "CLASS_POOL",
    "IN9_CLASSES",
    "IN9_VARIANTS",
    "COCO_CATEGORIES",
    "ADE_CLASSES",
    "JPEG_QUALITY",
    "MANIFEST",
    "DONE",
    "EmbeddedSizes",
    "SetBuilder",
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
