"""Readers of the transfer-learning datasets of iBOT Tab. 7, as the official evaluation reads them.

Source: bytedance/ibot ``evaluation/eval_cls.py`` (commit da316d8, DeiT's ``main.py``),
``build_dataset`` (:286-313) with its readers transcribed:

- CIFAR-10 / CIFAR-100 (:289-294): torchvision's ``CIFAR10`` / ``CIFAR100`` on the python pickles
  (``<root>/cifar-10-batches-py/``, ``<root>/cifar-100-python/``). Same reader here, with file
  presence instead of the md5 of the released archive, so the embedded copy (same format, other
  bytes) is read by the very same code; the class count is the meta file's name list (10 / 100);
- iNaturalist 2018 / 2019, ``INatDataset`` (:196-233): ``{train,val}<year>.json`` ``images``; an
  image's category id is the third component of its ``file_name``
  (``train_val2018/<super>/<id>/<hash>.jpg``); labels number the categories' ``category`` field
  (default ``name``) in order of first appearance among the train annotations. The taxonomy is
  ``categories.json`` (a list indexed by id, what the official reads); where it is absent (the
  iNat 2019 release ships none) the train json's own ``categories`` give the same list by ``id``;
- Stanford Cars, ``CarsDataset`` (:235-257): ``cars_annos.mat`` ``annotations`` (the all-images file of
  ``car_ims.tgz``), split by ``test``, image ``relative_im_path``. Deviation: the official counts the
  classes by field 4 (``bbox_y2``, a bug) and keeps the 1-based ``class`` as the label; here the
  label is ``class - 1`` over the split's classes (196): the same partition of the images;
- Flowers-102, ``FlwrsDataset`` (:259-284): ``jpg/`` sorted by name, ``imagelabels.mat`` labels
  (1-based), ``setid.mat``: train = ``trnid`` + ``valid``, test = ``tstid`` (1-based image numbers);
  label ``labels - 1``. Only image files of ``jpg/`` count (the layout check makes sure that is
  all of them, so the numbering is the official one).

Each reader yields ``(PIL image, label)`` and has ``num_classes`` (the official ``nb_classes``)
and ``targets``. :func:`read_transfer_set` dispatches on the dataset kind (:mod:`ibot.data.kinds`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.folder import default_loader

from ibot.data.folders import is_image_file

__all__ = ["TRANSFER_KINDS", "INAT_CATEGORY_LEVELS", "CIFAR10", "CIFAR100", "INatDataset", "CarsDataset",
           "FlowersDataset", "read_transfer_set"]

#: Dataset kinds read here, in Tab. 7 order (each a ``data.<kind>`` config key).
TRANSFER_KINDS: tuple[str, ...] = ("cifar10", "cifar100", "inat18", "inat19", "flowers", "cars")
#: iNat label granularities (eval_cls.py:169-171 ``--inat-category``).
INAT_CATEGORY_LEVELS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "supercategory", "family", "genus",
                                         "name")
_INAT_YEARS = {"inat18": 2018, "inat19": 2019}


def _unverified(files: list[list[str]]) -> list[list[str | None]]:
    """A torchvision file list without md5s: ``check_integrity`` then checks presence only."""
    return [[name, None] for name, _ in files]


class CIFAR10(datasets.CIFAR10):
    """``<root>/cifar-10-batches-py/``: data_batch_1..5 (train), test_batch, batches.meta."""

    train_list = _unverified(datasets.CIFAR10.train_list)
    test_list = _unverified(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class CIFAR100(CIFAR10):
    """``<root>/cifar-100-python/``: train, test, meta (fine labels)."""

    base_folder = datasets.CIFAR100.base_folder
    train_list = _unverified(datasets.CIFAR100.train_list)
    test_list = _unverified(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}


class _SampleList(Dataset):
    """``(path, label)`` samples read with torchvision's ``default_loader`` (the official classes
    subclass ImageFolder for exactly this)."""

    samples: list[tuple[str, int]]
    num_classes: int

    def __init__(self, transform: Callable | None) -> None:
        self.transform = transform
        self.loader = default_loader

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = self.loader(path)
        return (self.transform(image) if self.transform is not None else image), label

    def _check_labels(self, what: str) -> None:
        bad = sorted({t for t in self.targets if not 0 <= t < self.num_classes})
        if bad:
            raise ValueError(f"{what}: labels {bad[:5]} outside 0..{self.num_classes - 1}")


def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class INatDataset(_SampleList):
    """iNaturalist 2018/2019 (DeiT ``INatDataset``, eval_cls.py:196-233)."""

    def __init__(self, root: str | Path, train: bool = True, year: int = 2018, category: str = "name",
                 transform: Callable | None = None) -> None:
        super().__init__(transform)
        if category not in INAT_CATEGORY_LEVELS:
            raise ValueError(f"iNat category {category!r}: expected one of {INAT_CATEGORY_LEVELS}")
        root = Path(root)
        train_data = _load_json(root / f"train{year}.json")
        data = train_data if train else _load_json(root / f"val{year}.json")
        catalogue = root / "categories.json"
        if catalogue.is_file():
            categories: Any = _load_json(catalogue)  # a list: position = category id
        else:
            categories = {int(c["id"]): c for c in train_data["categories"]}
        targeter: dict[Any, int] = {}
        for elem in train_data["annotations"]:
            targeter.setdefault(categories[int(elem["category_id"])][category], len(targeter))
        self.num_classes = len(targeter)
        self.samples = []
        for elem in data["images"]:
            cut = elem["file_name"].split("/")
            label = targeter[categories[int(cut[2])][category]]
            self.samples.append((os.path.join(root, cut[0], cut[1], cut[2], cut[3]), label))


class CarsDataset(_SampleList):
    """Stanford Cars (eval_cls.py:235-257; labels ``class - 1``, see the module docstring)."""

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None) -> None:
        from scipy import io as scio

        super().__init__(transform)
        root = Path(root)
        annotations = scio.loadmat(root / "cars_annos.mat")["annotations"][0]
        split = [elem for elem in annotations if int(elem["test"].item()) == int(not train)]
        self.samples = [(os.path.join(root, str(elem["relative_im_path"].item())), int(elem["class"].item()) - 1)
                        for elem in split]
        self.num_classes = len(set(self.targets))
        self._check_labels(f"{root / 'cars_annos.mat'} ({'train' if train else 'test'} split)")


class FlowersDataset(_SampleList):
    """Oxford Flowers-102 (``FlwrsDataset``, eval_cls.py:259-284)."""

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None) -> None:
        from scipy import io as scio

        super().__init__(transform)
        root = Path(root)
        files = np.array(sorted(name for name in os.listdir(root / "jpg") if is_image_file(name)))
        labels = scio.loadmat(root / "imagelabels.mat")["labels"][0].astype(np.int64) - 1
        setid = scio.loadmat(root / "setid.mat")
        ids = (np.concatenate((setid["trnid"], setid["valid"]), axis=1)[0] if train else setid["tstid"][0])
        ids = ids.astype(np.int64) - 1
        self.num_classes = len(set(labels[ids].tolist()))
        self.samples = [(os.path.join(root, "jpg", name), int(label)) for name, label in zip(files[ids], labels[ids])]
        self._check_labels(f"{root / 'imagelabels.mat'} ({'train' if train else 'test'} split)")


def read_transfer_set(kind: str, root: str | Path, *, train: bool, transform: Callable | None = None,
                      inat_category: str = "name") -> Dataset:
    """The ``train`` (else val/test) split of dataset ``kind`` at ``root``, as the official reads it.

    The result has ``num_classes`` and ``targets``; items are ``(image, label)``.
    """
    if kind == "cifar10":
        return CIFAR10(str(root), train=train, transform=transform)
    if kind == "cifar100":
        return CIFAR100(str(root), train=train, transform=transform)
    if kind in _INAT_YEARS:
        return INatDataset(root, train=train, year=_INAT_YEARS[kind], category=inat_category, transform=transform)
    if kind == "cars":
        return CarsDataset(root, train=train, transform=transform)
    if kind == "flowers":
        return FlowersDataset(root, train=train, transform=transform)
    raise ValueError(f"unknown transfer dataset kind {kind!r}; choose from {TRANSFER_KINDS}")
