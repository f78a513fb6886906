"""Embedded Revisited Oxford 5k / Paris 6k in the revisitop layout (``revisitop/<dataset>/``):
``gnd_<dataset>.pkl`` (``imlist``, ``qimlist``, ``gnd``: per query ``bbx`` [x0, y0, x1, y1], ``easy``,
``hard``, ``junk`` indices into ``imlist``) and ``jpg/<name>.jpg``, read by :mod:`ibot.data.revisitop`.

Each set has ``revisitop_landmarks`` "landmarks": an embedded ImageNet class's look (shape, texture,
hue; :data:`~ibot.data.embedded.classes.CLASS_POOL`), Oxford the first classes of the pool, Paris the
last. Per landmark, ``revisitop_per_landmark`` database images show it at a random pose over a varied
background, labelled as revisitop labels real photos by how much of the landmark is visible:

- easy: large (65-95 % of the canvas side, as the embedded ImageNet objects), calm background;
- hard: smaller (50-70 %), a solid block hiding a sixth of its box;
- junk: small (20-30 %), busier background and half transparent: barely visible (the last quarter).

``revisitop_distractors`` images show no landmark (another class of the pool, large, or background only
for every third); ``revisitop_queries`` query images (round-robin over the landmarks) show it large,
their ``bbx`` the object's tight box. Images are ``revisitop_size`` wide and 4/5 as high, or the
transpose (real photos are not square), cut from a square canvas around the object.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.classes import CLASS_POOL, ClassSpec
from ibot.data.embedded.render import object_layers, save_jpeg, seeded_rng, tight_box, to_uint8
from ibot.data.revisitop import DATASETS, gnd_path, image_path

__all__ = ["BUILDER", "FIELDS", "LANDMARK_NAMES", "landmark_classes", "difficulty"]

FIELDS = ("revisitop_landmarks", "revisitop_per_landmark", "revisitop_distractors", "revisitop_queries",
          "revisitop_size")
#: Image name stems per set (real revisitop names are ``<landmark>_<6 digits>``).
LANDMARK_NAMES: dict[str, tuple[str, ...]] = {
    "roxford5k": ("all_souls", "ashmolean", "balliol", "bodleian", "christ_church", "cornmarket", "hertford",
                  "keble", "magdalen", "pitt_rivers"),
    "rparis6k": ("defense", "eiffel", "invalides", "louvre", "moulinrouge", "museedorsay", "notredame",
                 "pantheon", "pompidou", "sacrecoeur"),
}
_DISTRACTOR = {"roxford5k": "oxc1_random", "rparis6k": "paris_general"}
# (diameter fraction range, clutter range, background contrast) per kind of view
_VIEWS = {"easy": ((0.65, 0.95), (0, 2), 0.5), "hard": ((0.5, 0.7), (0, 2), 0.6),
          "junk": ((0.2, 0.3), (2, 4), 1.0), "query": ((0.65, 0.95), (0, 2), 0.5),
          "distractor": ((0.65, 0.95), (0, 2), 0.5)}


def landmark_classes(dataset: str, sizes: EmbeddedSizes) -> list[ClassSpec]:
    """The landmarks' looks: Oxford the first ``revisitop_landmarks`` pool classes, Paris the last."""
    count = sizes.revisitop_landmarks
    return list(CLASS_POOL[:count]) if dataset == DATASETS[0] else list(CLASS_POOL[len(CLASS_POOL) - count:])


def difficulty(index: int, sizes: EmbeddedSizes) -> str:
    """View kind of a landmark's ``index``-th database image: easy first, then hard, the last quarter junk."""
    n = sizes.revisitop_per_landmark
    junk = n // 4
    easy = (n - junk + 1) // 2
    return "easy" if index < easy else "hard" if index < n - junk else "junk"


def _window(rng: np.random.Generator, mask: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """A (top, left, height, width) landscape or portrait window (4:5) of the square canvas, centred on
    the object as far as the canvas allows (a large object may lose its rim, as landmarks in photos do)."""
    short = (4 * size) // 5
    height, width = (short, size) if rng.random() < 0.5 else (size, short)
    y0, y1, x0, x1 = tight_box(mask) if mask.any() else (0, size, 0, size)
    top = int(np.clip(round((y0 + y1 - height) / 2), 0, size - height))
    left = int(np.clip(round((x0 + x1 - width) / 2), 0, size - width))
    return top, left, height, width


def _render(root: str, seed: int, dataset: str, name: str, spec: ClassSpec | None, view: str, size: int,
            key: tuple[int, int]) -> list[float]:
    """Draw and save one image; returns the object's box [x0, y0, x1, y1] in the saved image."""
    rng = seeded_rng(seed, "revisitop", dataset, view, *key)
    diameter, clutter, contrast = _VIEWS[view]
    layers = object_layers(rng, spec or CLASS_POOL[0], size, diameter, clutter, background_contrast=contrast)
    mask = layers.mask if spec is not None else np.zeros_like(layers.mask)
    image = np.where(mask[..., None], layers.foreground, layers.background).astype(np.float64)
    if view == "junk":  # barely visible: half transparent over the background
        image[mask] = 0.5 * image[mask] + 0.5 * layers.background[mask]
    if view == "hard":  # a solid block hides a sixth of the object's box
        y0, y1, x0, x1 = tight_box(mask)
        h, w = max(1, (y1 - y0) // 3), max(1, (x1 - x0) // 2)
        oy, ox = y0 + int(rng.integers(0, y1 - y0 - h + 1)), x0 + int(rng.integers(0, x1 - x0 - w + 1))
        image[oy:oy + h, ox:ox + w] = rng.uniform(0, 255, 3)
    top, left, height, width = _window(rng, mask, size)
    save_jpeg(image_path(root, dataset, name), to_uint8(image[top:top + height, left:left + width]))
    if not mask.any():
        return [0.0, 0.0, float(width), float(height)]
    y0, y1, x0, x1 = tight_box(mask[top:top + height, left:left + width])
    return [float(x0), float(y0), float(x1), float(y1)]


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    size = sizes.revisitop_size
    for dataset in DATASETS:
        names = LANDMARK_NAMES[dataset]
        landmarks = landmark_classes(dataset, sizes)
        others = [spec for spec in CLASS_POOL if spec not in landmarks]
        database: list[tuple[str, ClassSpec | None, str, tuple[int, int], int]] = []  # name, look, view, key, landmark
        for lm, spec in enumerate(landmarks):
            for i in range(sizes.revisitop_per_landmark):
                database.append((f"{names[lm]}_{i:06d}", spec, difficulty(i, sizes), (lm, i), lm))
        for i in range(sizes.revisitop_distractors):  # every third one background only
            spec = others[i % len(others)] if others and i % 3 else None
            database.append((f"{_DISTRACTOR[dataset]}_{i:06d}", spec, "distractor", (0, i), -1))
        queries = [(f"{names[q % len(landmarks)]}_{900000 + q:06d}", landmarks[q % len(landmarks)], "query",
                    (q % len(landmarks), q), q % len(landmarks)) for q in range(sizes.revisitop_queries)]
        tasks = [(str(root), seed, dataset, name, spec, view, size, key)
                 for name, spec, view, key, _ in database + queries]
        boxes = list(run(_render, tasks))[len(database):]
        imlist = sorted(entry[0] for entry in database)
        index = {name: i for i, name in enumerate(imlist)}
        gnd = []
        for (_, _, _, _, lm), box in zip(queries, boxes):
            views = {"easy": [], "hard": [], "junk": []}
            for name, _, view, _, owner in database:
                if owner == lm:
                    views[view].append(index[name])
            gnd.append({"bbx": box, **{k: sorted(v) for k, v in views.items()}})
        cfg = {"imlist": imlist, "qimlist": [entry[0] for entry in queries], "gnd": gnd}
        gnd_path(root, dataset).write_bytes(pickle.dumps(cfg, protocol=2))


BUILDER = SetBuilder(FIELDS, _build)
