"""ImageNet label subsets (the SimCLR 1% / 10% splits) as ImageNet-layout folders.

A subset file lists one train image file name per line (``n01440764_10026.JPEG``), as the SimCLRv2
split files do (github.com/google-research/simclr ``imagenet_subsets/{1,10}percent.txt``; iBOT
``evaluation/README.md:61``). The class of an image is the wnid its name starts with, so the image
is ``<imagenet>/train/<wnid>/<name>``.

The official semi-supervised protocols "just change ``--data_path`` to the ImageNet splits"
(``evaluation/README.md:61``; ``run.sh:206`` ``data/imagenet_{1,10}p_split``): a folder whose
``train/`` holds only the listed images and whose ``val/`` is the full val set.
:func:`materialise_subset` builds exactly that, with symbolic links (no image is copied), so every
classification stage runs on a subset unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

__all__ = ["SUBSET_DIR", "SUBSET_FILE_NAMES", "default_subset_file", "read_subset_file", "subset_files",
           "materialise_subset"]

#: Folder of the subset files inside an ImageNet root (the SimCLR repository's folder name).
SUBSET_DIR = "imagenet_subsets"
#: ``<percent>percent.txt``: the SimCLR file names.
SUBSET_FILE_NAMES = {"1": "1percent.txt", "10": "10percent.txt"}
_RECORD = "SUBSET.json"


def default_subset_file(imagenet: str | Path, label: str) -> Path:
    """Where a subset file is looked for when its config key is null: ``<imagenet>/imagenet_subsets/<p>percent.txt``."""
    return Path(imagenet) / SUBSET_DIR / SUBSET_FILE_NAMES.get(str(label), f"{label}percent.txt")


def read_subset_file(path: str | Path) -> list[str]:
    """The image file names listed in ``path`` (one per line; blank lines ignored; duplicates refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file {path}: does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"subset file {path}: lists no image")
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})
    if duplicates:
        raise ValueError(f"subset file {path}: lists {len(duplicates)} images twice, e.g. {duplicates[:3]}")
    bad = [n for n in names if "/" in n or "_" not in n]
    if bad:
        raise ValueError(f"subset file {path}: expected train file names '<wnid>_<n>.JPEG', got e.g. {bad[:3]}")
    return names


def subset_files(imagenet: str | Path, names: list[str], *, source: str = "subset") -> list[Path]:
    """``<imagenet>/train/<wnid>/<name>`` of every listed name; an error names every one missing."""
    train = Path(imagenet) / "train"
    paths = [train / name.split("_", 1)[0] / name for name in names]
    missing = [name for name, path in zip(names, paths) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} listed images are not in {train}: "
                                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return paths


def _digest(imagenet: Path, names: list[str]) -> str:
    return hashlib.sha256(json.dumps([str(imagenet), names]).encode()).hexdigest()


def materialise_subset(imagenet: str | Path, subset_file: str | Path, dest: str | Path) -> Path:
    """``dest`` as an ImageNet root holding only the images of ``subset_file``: returns ``dest``.

    ``dest/train/<wnid>/<name>`` link to the listed train images, ``dest/val`` to the full val set.
    Every class folder of ``train/`` is kept, so class indices are those of the full dataset and of
    ``val/``; the subset must hold at least one image of every class (the SimCLR splits do). Built in a temporary folder and renamed into place; an existing
    ``dest`` made from the same root and list is reused, any other is replaced.
    """
    imagenet, dest = Path(imagenet).resolve(), Path(dest)
    names = read_subset_file(subset_file)
    paths = subset_files(imagenet, names, source=f"subset file {subset_file}")
    digest = _digest(imagenet, names)
    record = dest / _RECORD
    if record.is_file() and json.loads(record.read_text()).get("digest") == digest:
        return dest
    wnids = sorted(p.name for p in (imagenet / "train").iterdir() if p.is_dir())
    empty = sorted(set(wnids) - {path.parent.name for path in paths})
    if empty:  # an ImageFolder (ours, the official one) refuses a class folder without images
        raise ValueError(f"subset file {subset_file}: lists no image of {len(empty)} classes, e.g. {empty[:5]}")
    tmp = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for wnid in wnids:
        (tmp / "train" / wnid).mkdir(parents=True)
    for path in paths:
        (tmp / "train" / path.parent.name / path.name).symlink_to(path)
    (tmp / "val").symlink_to(imagenet / "val", target_is_directory=True)
    (tmp / _RECORD).write_text(json.dumps({"digest": digest, "imagenet": str(imagenet), "subset_file": str(subset_file),
                                           "images": len(names)}, indent=1) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest
