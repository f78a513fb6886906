"""Cheap on-disk layout checks for the evaluation datasets, with one clear error each.

Why: a wrong ``data.*`` path in the config should fail in seconds with a message
naming the config key, the path and the expected layout, not an hour into a job
inside a loader.  The checks only list directories, look at the first entries
and peek at annotation files, so they are fast on the real datasets too.  They
accept the real layouts (ImageNet with val sorted into wnid folders, COCO 2017,
ADEChallengeData2016, ImageNet-C/-A/-R, the backgrounds-challenge ``<variant>/val/``
tree, the Tab. 7 transfer sets as the official ``evaluation/eval_cls.py`` reads them) as
well as the embedded ones from :mod:`ibot.data.embedded`, and they never require files
that only the embedded generator writes.

There is one check per kind of :data:`ibot.data.kinds.DATASET_KINDS` (verified at import);
the expected layout in the messages is the kind's ``description``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from ibot.data.corruptions import CORRUPTIONS
from ibot.data.folders import class_folders, first_image, is_image_file
from ibot.data.imagenet9 import IN9_VARIANTS
from ibot.data.kinds import DATASET_KINDS, check_coverage

__all__ = ["KINDS", "DatasetLayoutError", "check_layout"]

KINDS: tuple[str, ...] = tuple(DATASET_KINDS)

# COCO and ADE20K name their files in a fixed format (mmdet reads the names from the annotations,
# mmseg's ADE20KDataset lists images by suffix); class-folder sets take any torchvision image suffix.
_JPEG = (".jpg", ".jpeg")
_PNG = (".png",)
_WNID = re.compile(r"n\d{8}")
_FULL_JSON_PARSE_LIMIT = 64 * 2**20  # bytes; larger annotation files are only peeked at


class DatasetLayoutError(ValueError):
    """A dataset directory does not have the layout its loader expects."""


class _Problem(Exception):
    """Internal: what is wrong, relative to the dataset root (wrapped by check_layout)."""


# ---------------------------------------------------------------- small helpers


def _require_dir(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_dir():
        raise _Problem(f"has no '{rel}/' folder")
    return path


def _require_images(root: Path, rel: str, suffixes: tuple[str, ...]) -> None:
    if first_image(_require_dir(root, rel), suffixes) is None:
        raise _Problem(f"has no {'/'.join(sorted(suffixes))} files in '{rel}/'")


def _require_class_folders(root: Path, rel: str) -> list[str]:
    """``rel`` must hold class folders, the first of which holds an image."""
    path = _require_dir(root, rel)
    classes = class_folders(path)
    if not classes:
        hint = " (its images lie directly in it; sort them into class folders)" if first_image(path) else ""
        raise _Problem(f"has no class folders in '{rel}/'{hint}")
    if first_image(path / classes[0]) is None:
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


def _check_imagenet22k(root: Path) -> None:
    """The fall11 release extracted one folder per synset (``<wnid>/*.JPEG``), no train/val split: the
    whole set is the pretraining data (Tab.3/Tab.15); class folders with images, peeked."""
    classes = _require_class_folders(root, ".")
    if len(classes) < 2:
        raise _Problem(f"has {len(classes)} class folder(s); expected the <wnid>/ folders of ImageNet-22K")


def _check_coco(root: Path) -> None:
    for split in ("train2017", "val2017"):
        _require_images(root, split, _JPEG)
        _peek_json(root, f"annotations/instances_{split}.json", ("images", "annotations", "categories"))


def _check_ade20k(root: Path) -> None:
    for split in ("training", "validation"):
        _require_images(root, f"images/{split}", _JPEG)
        _require_images(root, f"annotations/{split}", _PNG)


def _check_imagenet_c(root: Path) -> None:
    corruptions = sorted(set(class_folders(root)) & set(CORRUPTIONS))
    if not corruptions:
        raise _Problem("has no corruption folders (gaussian_noise/, fog/, ...)")
    for corruption in corruptions:
        severities = set(class_folders(root / corruption))
        missing = [s for s in "12345" if s not in severities]
        if missing:
            raise _Problem(f"has no severity folders {missing} in '{corruption}/'")
    _require_class_folders(root, f"{corruptions[0]}/1")


def _check_wnid_subset(root: Path) -> None:
    """ImageNet-A/-R: wnid class folders for a subset of the ImageNet classes."""
    wnids = [d for d in class_folders(root) if _WNID.fullmatch(d)]
    if not wnids:
        raise _Problem("has no wnid class folders (n########/)")
    if first_image(root / wnids[0]) is None:
        raise _Problem(f"has no images in '{wnids[0]}/'")


def _check_imagenet_9(root: Path) -> None:
    variants = sorted(set(class_folders(root)) & set(IN9_VARIANTS))
    if "original" not in variants:
        raise _Problem("has no 'original/' variant folder")
    for variant in variants:
        _require_class_folders(root, f"{variant}/val")


# ---------------------------------------------------------------- transfer sets (Tab. 7)


def _peek_mat(root: Path, rel: str, keys: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The shapes of ``keys`` in MATLAB file ``rel`` (its variable directory only: no array is read)."""
    from scipy import io as scio

    path = root / rel
    if not path.is_file():
        raise _Problem(f"has no '{rel}'")
    try:
        shapes = {name: tuple(shape) for name, shape, _ in scio.whosmat(str(path))}
    except (ValueError, TypeError, OSError) as exc:
        raise _Problem(f"has an unreadable '{rel}' ({exc})") from None
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise _Problem(f"has '{rel}' without the variables {missing}")
    return shapes


def _cifar_check(kind: str) -> Callable[[Path], None]:
    """torchvision's CIFAR root: its batch folder with every file the reader opens, a readable meta."""

    def check(root: Path) -> None:
        import pickle

        from ibot.data.transfer_sets import CIFAR10, CIFAR100

        reader = CIFAR10 if kind == "cifar10" else CIFAR100
        folder = reader.base_folder
        if not (root / folder).is_dir():
            hint = "; it is that folder itself: use its parent" if root.name == folder else ""
            raise _Problem(f"has no '{folder}/' folder{hint}")
        names = [name for name, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
        missing = [name for name in names if not (root / folder / name).is_file()]
        if missing:
            raise _Problem(f"has no {missing} in '{folder}/'")
        meta = f"{folder}/{reader.meta['filename']}"
        try:
            with open(root / meta, "rb") as f:
                classes = pickle.load(f, encoding="latin1")[reader.meta["key"]]
        except Exception as exc:  # any unpickling failure: a broken copy
            raise _Problem(f"has an unreadable '{meta}' ({type(exc).__name__}: {exc})") from None
        if not classes:
            raise _Problem(f"has '{meta}' with no {reader.meta['key']}")

    return check


def _inat_check(year: int) -> Callable[[Path], None]:
    """iNat json annotations and the image tree they name (``train_val<year>/<super>/<id>/``)."""

    def check(root: Path) -> None:
        for split in ("train", "val"):
            _peek_json(root, f"{split}{year}.json", ("images", "annotations", "categories"))
        tree = f"train_val{year}"
        supers = class_folders(_require_dir(root, tree))
        ids = class_folders(root / tree / supers[0]) if supers else []
        if not ids:
            raise _Problem(f"has no '{tree}/<supercategory>/<category id>/' folders")
        if first_image(root / tree / supers[0] / ids[0], _JPEG) is None:
            raise _Problem(f"has no .jpg files in '{tree}/{supers[0]}/{ids[0]}/'")
        if (root / "categories.json").exists():
            _peek_json_list(root, "categories.json")

    return check


def _peek_json_list(root: Path, rel: str) -> None:
    with (root / rel).open("rb") as f:
        if not f.read(4096).lstrip().startswith(b"["):
            raise _Problem(f"has '{rel}' that is not a JSON list (categories indexed by id)")


def _check_flowers(root: Path) -> None:
    images = [name for name in os.listdir(_require_dir(root, "jpg")) if is_image_file(name)]
    if not images:
        raise _Problem("has no images in 'jpg/'")
    labelled = math.prod(_peek_mat(root, "imagelabels.mat", ("labels",))["labels"])
    _peek_mat(root, "setid.mat", ("trnid", "valid", "tstid"))
    if labelled != len(images):  # the reader numbers the sorted jpg/ files: one label each
        raise _Problem(f"has {len(images)} images in 'jpg/' but 'imagelabels.mat' labels {labelled}")


def _check_cars(root: Path) -> None:
    _peek_mat(root, "cars_annos.mat", ("annotations",))
    _require_images(root, "car_ims", _JPEG)


def _check_davis(root: Path) -> None:
    """DAVIS-2017 as eval_video_segmentation.py:279-286 and davis2017/davis.py read it: every video of
    ImageSets/2017/val.txt has JPEG frames and the first frame's annotation."""
    listing = root / "ImageSets" / "2017" / "val.txt"
    if not listing.is_file():
        raise _Problem("has no 'ImageSets/2017/val.txt'")
    videos = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not videos:
        raise _Problem("has an empty 'ImageSets/2017/val.txt'")
    for video in videos:
        frames = sorted(name for name in os.listdir(_require_dir(root, f"JPEGImages/480p/{video}"))
                        if name.endswith(".jpg"))
        if not frames:
            raise _Problem(f"has no .jpg frames in 'JPEGImages/480p/{video}/'")
        first = f"Annotations/480p/{video}/{frames[0][:-len('.jpg')]}.png"
        if not (root / first).is_file():
            raise _Problem(f"has no first-frame annotation '{first}'")


def _check_revisitop(root: Path) -> None:
    """Revisited Oxford and Paris as eval_image_retrieval.py:29-76 reads them: per set a ground-truth pickle
    (loaded with the restricted unpickler; keys and indices validated) and the images it lists (a few peeked)."""
    import pickle

    from ibot.data.revisitop import DATASETS, gnd_path, image_path, load_gnd, validate_gnd

    for dataset in DATASETS:
        rel = gnd_path(Path(), dataset).as_posix()
        if not (root / rel).is_file():
            raise _Problem(f"has no '{rel}'")
        try:
            cfg = load_gnd(root / rel)
            validate_gnd(cfg, f"'{rel}'")
        except (pickle.UnpicklingError, ValueError, EOFError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise _Problem(f"has an unusable '{rel}' ({type(exc).__name__}: {exc})") from None
        names = list(cfg["imlist"][:3]) + list(cfg["imlist"][-2:]) + list(cfg["qimlist"][:2])
        for name in names:
            if not image_path(root, dataset, name).is_file():
                raise _Problem(f"has no '{image_path(Path(), dataset, name).as_posix()}' (listed in '{rel}')")


_CHECKS: dict[str, Callable[[Path], None]] = {
    "imagenet": _check_imagenet,
    "imagenet22k": _check_imagenet22k,
    "coco": _check_coco,
    "ade20k": _check_ade20k,
    "imagenet_c": _check_imagenet_c,
    "imagenet_a": _check_wnid_subset,
    "imagenet_r": _check_wnid_subset,
    "imagenet_9": _check_imagenet_9,
    "cifar10": _cifar_check("cifar10"),
    "cifar100": _cifar_check("cifar100"),
    "inat18": _inat_check(2018),
    "inat19": _inat_check(2019),
    "flowers": _check_flowers,
    "cars": _check_cars,
    "davis": _check_davis,
    "revisitop": _check_revisitop,
}
check_coverage("ibot.data.layouts._CHECKS", _CHECKS, DATASET_KINDS)


def check_layout(kind: str, root: str | Path, *, config_key: str | None = None) -> None:
    """Raise DatasetLayoutError unless ``root`` looks like a ``kind`` dataset.

    The message reads ``<config_key>: <root> <problem>; expected the <title> layout: <description>``.
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
    spec = DATASET_KINDS[kind]
    raise DatasetLayoutError(f"{prefix}{root} {problem}; expected the {spec.title} layout: {spec.description}")
