"""Image files and class folders, as torchvision's ImageFolder sees them.

Why: the layout checks, the robustness datasets and the training loaders must agree on what an
image file is; all use torchvision's ``IMG_EXTENSIONS`` (case-insensitive) through
:func:`is_image_file`. Hidden entries (``.ipynb_checkpoints/``, macOS ``._*`` files) are skipped:
they are never classes or images.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

__all__ = ["IMG_EXTENSIONS", "is_image_file", "class_folders", "first_image"]


def is_image_file(path: str, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> bool:
    """True for a non-hidden file name with one of ``extensions`` (lower case, as in torchvision)."""
    name = os.path.basename(path)
    return not name.startswith(".") and has_file_allowed_extension(name, extensions)


def class_folders(path: str | Path) -> list[str]:
    """Sorted non-hidden sub-folder names of ``path`` (torchvision's ``find_classes`` order)."""
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def first_image(path: str | Path, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> str | None:
    """Name of the first image file directly in ``path``, or None (stops early: cheap on huge folders)."""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file() and is_image_file(entry.name, extensions):
                return entry.name
    return None
