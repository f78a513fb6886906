"""Embedded DAVIS-2017: ``davis/{JPEGImages,Annotations}/480p/<video>/%05d.{jpg,png}`` + ``ImageSets/2017/val.txt``.

The layout the official ``evaluation/eval_video_segmentation.py`` reads (:279-286: the video list, the
sorted ``*.jpg`` frames, the first frame's annotation by path substitution) and the DAVIS 2017
evaluation reads (``davis2017/davis.py``: every ``*.png`` of ``Annotations/480p/<video>/``). Annotations
are palette ('P') PNGs whose pixel values are object ids (0 = background) with the DAVIS (= PASCAL VOC)
colour palette, as the real ones.

A video: a static textured background (smooth noise, gradient, small solid distractors) and 1-2
textured objects (shape, texture and colours drawn per object) that translate, rotate and breathe in
scale smoothly over the frames; later objects occlude earlier ones. Frames are landscape
(``davis_size`` wide, 3/5 as tall, like 854x480), so the official 64-multiple resizing rule applies as on
the real data. The folder name stays ``480p`` (the official scripts hard-code it), whatever the size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.render import (SHAPE_NAMES, TEXTURES, Placement, background, place_shape, save_jpeg,
                                       seeded_rng, textured_fill, to_uint8, write_text)

__all__ = ["BUILDER", "davis_palette", "frame_shape", "video_name"]

#: Shapes whose extent is clear at a few patches (thin or holed ones are left out).
_SHAPES = tuple(s for s in SHAPE_NAMES if s not in ("ring", "crescent", "cross"))


def davis_palette() -> np.ndarray:
    """The 256x3 uint8 palette of the DAVIS annotations (the PASCAL VOC bit-interleaved colour map)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, colour = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[index] = colour
    return palette


def frame_shape(sizes: EmbeddedSizes) -> tuple[int, int]:
    """(height, width) of the embedded frames: landscape, 3/5 as tall as wide (DAVIS 480p is 480x854)."""
    return max(16, (3 * sizes.davis_size) // 5), sizes.davis_size


def video_name(index: int) -> str:
    return f"video{index:02d}"


def _trajectory(rng: np.random.Generator, height: int, width: int, slot: int, slots: int,
                frames: int) -> list[Placement]:
    """Smooth motion of one object: linear drift of its centre, steady rotation, a scale swell."""
    radius0 = rng.uniform(0.2, 0.28) * height
    lo, hi = width * slot / slots, width * (slot + 1) / slots  # objects start in separate columns
    cx0 = rng.uniform(lo + 0.5 * radius0, hi - 0.5 * radius0)
    cy0 = rng.uniform(1.3 * radius0, height - 1.3 * radius0)
    step = rng.uniform(0.03, 0.06) * width * rng.choice([-1, 1], 2) * np.array([1.0, 0.5])
    angle0, spin = rng.uniform(0, 2 * np.pi), rng.uniform(-0.12, 0.12)
    swell, phase = rng.uniform(0.1, 0.2), rng.uniform(0, 2 * np.pi)
    placements = []
    for t in range(frames):
        radius = radius0 * (1 + swell * np.sin(phase + 0.6 * t))
        cx = float(np.clip(cx0 + step[0] * t, radius, width - radius))
        cy = float(np.clip(cy0 + step[1] * t, radius, height - radius))
        placements.append(Placement(cx, cy, float(radius), float(angle0 + spin * t)))
    return placements


def _video(root: str, seed: int, sizes: EmbeddedSizes, index: int) -> None:
    """Write one video's frames and palette annotations (everything seeded by (seed, davis, index))."""
    rng = seeded_rng(seed, "davis", index)
    height, width = frame_shape(sizes)
    scene = background(rng, width, (1, 3))[:height]  # square canvas, cropped to landscape
    objects = []
    n_objects = 1 + index % 2  # alternate 1 and 2 objects
    for slot in range(n_objects):
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        freq = float(rng.uniform(2.0, 3.0))
        objects.append((shape, texture, freq, _trajectory(rng, height, width, slot, n_objects, sizes.davis_frames),
                        int(rng.integers(2**31))))
    name, palette = video_name(index), davis_palette().ravel()
    for t in range(sizes.davis_frames):
        image, labels = scene.copy(), np.zeros((height, width), dtype=np.uint8)
        for object_id, (shape, texture, freq, path, colour_seed) in enumerate(objects, start=1):
            mask = place_shape(shape, path[t], width)[0][:height]
            colours = np.random.default_rng(colour_seed)  # the same colours in every frame
            fill = textured_fill(colours, texture, freq, path[t], width)[:height]
            image[mask], labels[mask] = fill[mask], object_id
        save_jpeg(Path(root) / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", to_uint8(image))
        annotation = Path(root) / "Annotations" / "480p" / name / f"{t:05d}.png"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        png = Image.fromarray(labels)
        png.putpalette(palette)  # 'L' -> 'P': the pixel values stay the object ids
        png.save(annotation, format="PNG")


def _build(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    list(run(_video, [(str(root), seed, sizes, i) for i in range(sizes.davis_videos)]))
    names = "".join(f"{video_name(i)}\n" for i in range(sizes.davis_videos))
    write_text(root / "ImageSets" / "2017" / "val.txt", names)


BUILDER = SetBuilder(("davis_videos", "davis_frames", "davis_size"), _build)
