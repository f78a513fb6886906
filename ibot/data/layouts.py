"""Cheap on-disk layout checks for the evaluation datasets, with one clear error each.

Why: a wrong ``data.*`` path in the config should fail in seconds with a message
naming the config key, the path and the expected layout, not an hour into a job
inside a loader.  The checks only list directories, look at the first entries
and peek at annotation files, so they are fast on the real datasets too.  They
accept the real layouts (ImageNet with val sorted into wnid folders, COCO 2017,
ADEChallengeData2016, ImageNet-C/-A, the backgrounds-challenge ``<variant>/val/``
tree) as well as the embedded ones from :mod:`ibot.data.embedded`, and they
never require files that only the embedded generator writes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from ibot.data.corruptions import CORRUPTIONS

__all__ = ["KINDS", "EXPECTED", "DatasetLayoutError", "check_layout"]

KINDS: tuple[str, ...] = ("imagenet", "coco", "ade20k", "imagenet_c", "imagenet_a", "imagenet_r", "imagenet_9")

EXPECTED: dict[str, str] = {
    "imagenet": "an ImageNet ImageFolder layout train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
    "coco": "a COCO 2017 layout train2017/*.jpg, val2017/*.jpg and annotations/instances_{train,val}2017.json",
    "ade20k": (
        "an ADEChallengeData2016 layout images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"
    ),
    "imagenet_c": "an ImageNet-C layout <corruption>/<severity 1-5>/<wnid>/*.JPEG (e.g. gaussian_noise/1/n01440764/)",
    "imagenet_a": "an ImageNet-A layout <wnid>/*.jpg with class folders named like n01498041",
    "imagenet_r": "an ImageNet-R layout <wnid>/*.jpg with class folders named like n01443537",
    "imagenet_9": "a backgrounds-challenge (ImageNet-9) layout <variant>/val/<class>/*.JPEG (variant: original, ...)",
}

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
_JPEG = frozenset({".jpeg", ".jpg"})
_WNID = re.compile(r"n\d{8}")
_IMAGENET_C_CORRUPTIONS = frozenset(CORRUPTIONS)
_IN9_VARIANTS = frozenset(
    {"original", "only_fg", "mixed_same", "mixed_rand", "mixed_next", "no_fg", "only_bg_b", "only_bg_t"}
)
_FULL_JSON_PARSE_LIMIT = 64 * 2**20  # bytes; larger annotation files are only peeked at


class DatasetLayoutError(ValueError):
    """A dataset directory does not have the layout its loader expects."""


class _Problem(Exception):
    """Internal: what is wrong, relative to the dataset root (wrapped by check_layout)."""


# ---------------------------------------------------------------- small helpers


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _first_image(path: Path, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> str | None:
    """Name of the first image file found in ``path`` (stops early: cheap on huge folders)."""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in suffixes:
                return entry.name
    return None


def _require_dir(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_dir():
        raise _Problem(f"has no '{rel}/' folder")
    return path


def _require_images(root: Path, rel: str, suffixes: frozenset[str]) -> None:
    if _first_image(_require_dir(root, rel), suffixes) is None:
        raise _Problem(f"has no {'/'.join(sorted(suffixes))} files in '{rel}/'")


def _require_class_folders(root: Path, rel: str) -> list[str]:
    """``rel`` must hold class folders, the first of which holds an image."""
    path = _require_dir(root, rel)
    classes = _subdirs(path)
    if not classes:
        hint = " (its images lie directly in it; sort them into class folders)" if _first_image(path) else ""
        raise _Problem(f"has no class folders in '{rel}/'{hint}")
    if _first_image(path / classes[0]) is None:
        raise _Problem(f"has no images in '{rel}/{classes[0]}/'")
    return classes


def _peek_json(root: Path, rel: str, keys: tuple[str, ...]) -> None:
    """Fully parse small JSON files (checking ``keys``); only sniff the start of big ones."""
    path = root / rel
    if not path.is_file():
        raise _Problem(f"has no '{rel}'")
    size = path.stat().st_size
    if size <= _FULL_JSON_PARSE_LIMIT:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Problem(f"has an unparseable '{rel}' ({exc})") from None
        missing = [k for k in keys if not isinstance(data, dict) or k not in data]
        if missing:
            raise _Problem(f"has '{rel}' without the keys {missing}")
        return
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"{"):
        raise _Problem(f"has '{rel}' that is not a JSON object")


# ---------------------------------------------------------------- per-kind checks


def _check_imagenet(root: Path) -> None:
    train = _require_class_folders(root, "train")
    val = _require_class_folders(root, "val")
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise _Problem(f"has val/ class folders missing from train/: {unknown[:5]}")


def _check_coco(root: Path) -> None:
    for split in ("train2017", "val2017"):
        _require_images(root, split, _JPEG)
        _peek_json(root, f"annotations/instances_{split}.json", ("images", "annotations", "categories"))


def _check_ade20k(root: Path) -> None:
    for split in ("training", "validation"):
        _require_images(root, f"images/{split}", _JPEG)
        _require_images(root, f"annotations/{split}", frozenset({".png"}))


def _check_imagenet_c(root: Path) -> None:
    corruptions = sorted(set(_subdirs(root)) & _IMAGENET_C_CORRUPTIONS)
    if not corruptions:
        raise _Problem("has no corruption folders (gaussian_noise/, fog/, ...)")
    for corruption in corruptions:
        severities = set(_subdirs(root / corruption))
        missing = [s for s in "12345" if s not in severities]
        if missing:
            raise _Problem(f"has no severity folders {missing} in '{corruption}/'")
    _require_class_folders(root, f"{corruptions[0]}/1")


def _check_imagenet_a(root: Path) -> None:
    wnids = [d for d in _subdirs(root) if _WNID.fullmatch(d)]
    if not wnids:
        raise _Problem("has no wnid class folders (n########/)")
    if _first_image(root / wnids[0]) is None:
        raise _Problem(f"has no images in '{wnids[0]}/'")


def _check_imagenet_9(root: Path) -> None:
    variants = sorted(set(_subdirs(root)) & _IN9_VARIANTS)
    if "original" not in variants:
        raise _Problem("has no 'original/' variant folder")
    for variant in variants:
        _require_class_folders(root, f"{variant}/val")


_CHECKS: dict[str, Callable[[Path], None]] = {
    "imagenet": _check_imagenet,
    "coco": _check_coco,
    "ade20k": _check_ade20k,
    "imagenet_c": _check_imagenet_c,
    "imagenet_a": _check_imagenet_a,
    "imagenet_r": _check_imagenet_a,  # same layout: a subset of wnid folders
    "imagenet_9": _check_imagenet_9,
}


def check_layout(kind: str, root: str | Path, *, config_key: str | None = None) -> None:
    """Raise DatasetLayoutError unless ``root`` looks like a ``kind`` dataset.

    The message reads ``<config_key>: <root> <problem>; expected <layout>``.
    """
    if kind not in _CHECKS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {KINDS}")
    root = Path(root)
    try:
        if not root.exists():
            raise _Problem("does not exist")
        if not root.is_dir():
            raise _Problem("is not a directory")
        _CHECKS[kind](root)
    except _Problem as exc:
        problem = str(exc)
    except OSError as exc:  # e.g. permission denied while listing
        problem = f"cannot be read ({exc})"
    else:
        return
    prefix = f"{config_key}: " if config_key else ""
    raise DatasetLayoutError(f"{prefix}{root} {problem}; expected {EXPECTED[kind]}")
