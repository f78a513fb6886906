"""Embedded iNaturalist 2018 and 2019 in the release json format DeiT's ``INatDataset`` reads.

- ``inat2018/train2018.json``, ``val2018.json``: COCO-style ``info``, ``images`` (``id``,
  ``file_name``, ``width``, ``height``, ...), ``annotations`` (``id``, ``image_id``, ``category_id``),
  ``categories`` and ``licenses``; ``categories.json``: the full taxonomy as a list indexed by id
  (shipped with iNat 2018); images ``train_val2018/<supercategory>/<category id>/<32-hex>.jpg``;
- ``inat2019/``: the same with ``2019``, supercategory folders named as in that release and no
  ``categories.json`` (the 2019 release puts the taxonomy into the annotation files only).

Images are listed in a seeded shuffled order, so labels (numbered by first appearance among the
train annotations) differ from category ids, as with the real files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.render import dump_json, save_jpeg, seeded_rng, write_text
from ibot.data.embedded.transfer import TRANSFER_FIELDS, transfer_classes, transfer_layers, transfer_splits

__all__ = ["INAT18_BUILDER", "INAT19_BUILDER", "SUPERCATEGORIES"]

#: Supercategory folder names of each release (a subset), assigned to classes in turn.
SUPERCATEGORIES = {2018: ("Plantae", "Insecta", "Aves", "Reptilia", "Mammalia", "Fungi"),
                   2019: ("Plants", "Insects", "Birds", "Reptiles", "Amphibians", "Fungi")}
#: Taxonomic levels above the species and how many consecutive labels share one name at that level.
_TAXA = (("kingdom", 8), ("phylum", 6), ("class", 4), ("order", 3), ("family", 2), ("genus", 1))


def _category(year: int, label: int, spec_name: str) -> dict[str, Any]:
    """A category record with a synthetic taxonomy (coarser levels group more species)."""
    taxonomy = {level: f"{level.capitalize()}{label // share}" for level, share in _TAXA}
    record = {"id": label, "name": f"{taxonomy['genus']} {spec_name.split()[0].lower()}", **taxonomy}
    if year == 2018:
        record["supercategory"] = SUPERCATEGORIES[year][label % len(SUPERCATEGORIES[year])]
    return record


def _file_name(seed: int, year: int, split: str, label: int, index: int) -> str:
    digest = hashlib.md5(f"{seed}/{year}/{split}/{label}/{index}".encode()).hexdigest()
    return f"train_val{year}/{SUPERCATEGORIES[year][label % len(SUPERCATEGORIES[year])]}/{label}/{digest}.jpg"


def _inat_file(root: str, seed: int, sizes: EmbeddedSizes, year: int, split: str, label: int, index: int) -> None:
    image = transfer_layers(seed, f"inat{year}", split, label, index, sizes.transfer_size).image
    save_jpeg(Path(root) / _file_name(seed, year, split, label, index), image)


def _build(year: int, root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    classes = transfer_classes(sizes)
    categories = [_category(year, label, spec.name) for label, spec in enumerate(classes)]
    size = sizes.transfer_size
    image_id = 0
    for split, count in transfer_splits(sizes):
        keys = [(label, i) for label in range(len(classes)) for i in range(count)]
        order = seeded_rng(seed, f"inat{year}", split, "order").permutation(len(keys))
        keys = [keys[j] for j in order]
        list(run(_inat_file, [(str(root), seed, sizes, year, split, label, i) for label, i in keys]))
        images, annotations = [], []
        for label, i in keys:
            image_id += 1
            images.append({"id": image_id, "file_name": _file_name(seed, year, split, label, i), "width": size,
                           "height": size, "license": 1, "rights_holder": "ibot.data.embedded"})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": label})
        # the annotation files carry the short category records; 2019's the full taxonomy
        short = [{k: c[k] for k in ("id", "name", "supercategory")} for c in categories] if year == 2018 else categories
        document = {"info": {"year": year, "description": f"embedded iNaturalist {year} (synthetic)",
                             "contributor": "ibot.data.embedded", "version": "1.0"},
                    "images": images, "annotations": annotations, "categories": short,
                    "licenses": [{"id": 1, "name": "synthetic", "url": ""}]}
        write_text(root / f"{'train' if split == 'train' else 'val'}{year}.json", dump_json(document) + "\n")
    if year == 2018:
        write_text(root / "categories.json", dump_json(categories) + "\n")


def _build_2018(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    _build(2018, root, seed, sizes, run)


def _build_2019(root: Path, seed: int, sizes: EmbeddedSizes, run: Mapper) -> None:
    _build(2019, root, seed, sizes, run)


INAT18_BUILDER = SetBuilder(TRANSFER_FIELDS, _build_2018)
INAT19_BUILDER = SetBuilder(TRANSFER_FIELDS, _build_2019)
