"""Embedded dataset generator (ibot.data.embedded), layout validators (ibot.data.layouts) and the
dataset kinds table they are both keyed by (ibot.data.kinds).

One small generation is shared by the session; the checks read it with the real
loaders (torchvision ImageFolder, pycocotools) and compare ImageNet-9 variants
against the exact masks re-rendered by the generator.
"""

from __future__ import annotations

import colorsys
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ibot.data import embedded
from ibot.data.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt
from ibot.data.embedded import (
    ADE_CLASSES,
    COCO_CATEGORIES,
    IN9_VARIANTS,
    ROOT_NAMES,
    EmbeddedSizes,
    generate,
    imagenet_classes,
    imagenet_layers,
)
from ibot.data.kinds import DATASET_KINDS, check_coverage
from ibot.data.layouts import KINDS, DatasetLayoutError, check_layout

# pycocotools 2.0.x under numpy 2 warns on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = EmbeddedSizes(
    classes=4,
    train_per_class=3,
    val_per_class=4,
    image_size=32,
    c_per_class=1,
    a_classes=2,
    a_per_class=2,
    coco_train=6,
    coco_val=3,
    coco_size=64,
    ade_train=3,
    ade_val=2,
    ade_size=64,
    transfer_classes=3,
    transfer_train_per_class=2,
    transfer_val_per_class=2,
    davis_videos=2,
    davis_frames=3,
    davis_size=64,
)


@pytest.fixture(scope="session")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("embedded"), seed=0, sizes=SMALL)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def _val_sample(name: str) -> tuple[embedded.ClassSpec, int]:
    """Invert the val numbering: ILSVRC2012_val_<n> -> (class, index within class)."""
    class_pos, index = divmod(int(Path(name).stem.rsplit("_", 1)[1]) - 1, SMALL.val_per_class)
    return imagenet_classes(SMALL)[class_pos], index


# ---------------------------------------------------------------- determinism & atomicity


def test_same_seed_is_byte_identical_for_any_worker_count(roots: dict[str, Path], tmp_path: Path) -> None:
    again = generate(tmp_path, seed=0, sizes=SMALL, workers=2)
    for name, root in roots.items():
        assert _tree(again[name]) == _tree(root), name


def test_different_seed_gives_different_images(roots: dict[str, Path], tmp_path: Path) -> None:
    other = _tree(generate(tmp_path, seed=1, sets=["imagenet"], sizes=SMALL)["imagenet"])
    base = _tree(roots["imagenet"])
    assert other.keys() == base.keys()
    images = [k for k in base if k.endswith(".JPEG")]
    assert all(other[k] != base[k] for k in images)


def test_manifest_marks_complete_sets_and_detects_tampering(roots: dict[str, Path], tmp_path: Path) -> None:
    for root in roots.values():
        assert embedded.is_complete(root)
    copy = shutil.copytree(roots["imagenet_a"], tmp_path / "imagenet_a")
    embedded.verify(copy)
    next(copy.rglob("*.JPEG")).write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="modified"):
        embedded.verify(copy)
    (copy / embedded.DONE).unlink()
    assert not embedded.is_complete(copy)


def test_generate_reuses_complete_sets_and_refuses_foreign_dirs(roots: dict[str, Path], tmp_path: Path) -> None:
    out = roots["imagenet"].parent
    before = (roots["imagenet"] / embedded.MANIFEST).stat().st_mtime_ns
    assert generate(out, seed=0, sets=["imagenet"], sizes=SMALL)["imagenet"] == roots["imagenet"]
    assert (roots["imagenet"] / embedded.MANIFEST).stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="seed"):
        generate(out, seed=3, sets=["imagenet"], sizes=SMALL)
    (tmp_path / "imagenet").mkdir()  # half-written or foreign: no DONE marker
    with pytest.raises(FileExistsError, match="DONE"):
        generate(tmp_path, sets=["imagenet"], sizes=SMALL)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_sizes_are_validated() -> None:
    with pytest.raises(ValueError, match="classes"):
        EmbeddedSizes(classes=11)
    with pytest.raises(ValueError, match="image_size"):
        EmbeddedSizes(image_size=16)
    with pytest.raises(ValueError, match="c_per_class"):
        EmbeddedSizes(val_per_class=2, c_per_class=3)


def test_cli_writes_requested_sets_with_size_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--out",
        str(tmp_path),
        "--sets",
        "imagenet_a",
        "--size",
        "classes=2",
        "--size",
        "a_classes=1",
        "--size",
        "a_per_class=1",
    ]
    assert embedded.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"imagenet_a": str(tmp_path / "imagenet_a")}
    assert len(list((tmp_path / "imagenet_a").rglob("*.JPEG"))) == 1


# ---------------------------------------------------------------- formats read by the real loaders


def test_imagenet_is_an_imagefolder_with_real_metadata(roots: dict[str, Path]) -> None:
    from torchvision.datasets import ImageFolder

    root = roots["imagenet"]
    wnids = [c.wnid for c in imagenet_classes(SMALL)]
    for split, per_class in (("train", SMALL.train_per_class), ("val", SMALL.val_per_class)):
        dataset = ImageFolder(str(root / split))
        assert dataset.classes == wnids
        assert len(dataset) == SMALL.classes * per_class
        image, _ = dataset[0]
        assert image.size == (SMALL.image_size, SMALL.image_size)
    assert all(p.name.startswith("ILSVRC2012_val_") for p in (root / "val").rglob("*.JPEG"))
    assert json.loads((root / "classes.json").read_text()) == {c.wnid: c.name for c in imagenet_classes(SMALL)}
    for line, spec in zip(
        (root / "LOC_synset_mapping.txt").read_text().splitlines(), imagenet_classes(SMALL), strict=True
    ):
        assert line == f"{spec.wnid} {spec.names}"


def test_coco_loads_in_pycocotools_and_masks_match_boxes(roots: dict[str, Path]) -> None:
    from pycocotools.coco import COCO

    root = roots["coco"]
    crowds = 0
    for split, count in (("train", SMALL.coco_train), ("val", SMALL.coco_val)):
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        assert len(coco.getImgIds()) == count
        assert sorted(coco.getCatIds()) == [c[0] for c in COCO_CATEGORIES] == [3, 18, 44]
        for img in coco.loadImgs(coco.getImgIds()):
            assert Image.open(root / f"{split}2017" / img["file_name"]).size == (img["width"], img["height"])
        for ann in coco.loadAnns(coco.getAnnIds()):
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"] > 0
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            mask_box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=float)
            x, y, w, h = ann["bbox"]
            ann_box = np.array([x, y, x + w, y + h])
            if ann["iscrowd"]:  # box computed from the RLE mask itself
                crowds += 1
                assert isinstance(ann["segmentation"]["counts"], list)
                assert np.array_equal(mask_box, ann_box)
            else:  # box from polygon vertices, like real COCO: tips may miss pixel centres
                assert isinstance(ann["segmentation"], list)
                assert np.all(mask_box[:2] >= ann_box[:2] - 1) and np.all(mask_box[2:] <= ann_box[2:] + 1)
                assert np.abs(mask_box - ann_box).max() <= 2
    assert crowds >= 1


def test_coco_objects_are_few_and_large_for_the_embedded_detection(roots: dict[str, Path]) -> None:
    """The embedded detection stage trains ~100 iterations: every image (none is dropped by mmdet's
    filter_empty_gt) holds 1-2 separate objects whose boxes span 30-61% of the image side."""
    from pycocotools.coco import COCO

    for split in ("train", "val"):
        coco = COCO(str(roots["coco"] / "annotations" / f"instances_{split}2017.json"))
        for image_id in coco.getImgIds():
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
            assert 1 <= len(anns) <= 2
            masks = [coco.annToMask(a).astype(bool) for a in anns]
            assert not (len(masks) == 2 and (masks[0] & masks[1]).any())
            for ann in anns:
                assert 0.3 * SMALL.coco_size <= max(ann["bbox"][2:]) <= 0.61 * SMALL.coco_size + 1


def test_ade20k_labels_are_valid_class_ids(roots: dict[str, Path]) -> None:
    root = roots["ade20k"]
    assert (root / "classes.txt").read_text().splitlines() == list(ADE_CLASSES)
    for folder, prefix, count in (("training", "train", SMALL.ade_train), ("validation", "val", SMALL.ade_val)):
        images = sorted((root / "images" / folder).glob("*.jpg"))
        labels = sorted((root / "annotations" / folder).glob("*.png"))
        assert (
            [p.stem for p in images]
            == [p.stem for p in labels]
            == [f"ADE_{prefix}_{i:08d}" for i in range(1, count + 1)]
        )
        for path in labels:
            label = Image.open(path)
            assert label.mode == "L" and label.size == (SMALL.ade_size, SMALL.ade_size)
            assert np.asarray(label).max() <= len(ADE_CLASSES)


def test_imagenet_c_has_all_corruptions_and_severities(roots: dict[str, Path]) -> None:
    from torchvision.datasets import ImageFolder

    root = roots["imagenet_c"]
    wnids = [c.wnid for c in imagenet_classes(SMALL)]
    val_names = {
        p.relative_to(roots["imagenet"] / "val").as_posix() for p in (roots["imagenet"] / "val").rglob("*.JPEG")
    }
    for corruption in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS:
        for severity in range(1, 6):
            folder = root / corruption / str(severity)
            dataset = ImageFolder(str(folder))
            assert dataset.classes == wnids and len(dataset) == SMALL.classes * SMALL.c_per_class
            assert {p.relative_to(folder).as_posix() for p in folder.rglob("*.JPEG")} <= val_names


def test_imagenet_a_uses_a_subset_of_classes(roots: dict[str, Path]) -> None:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(roots["imagenet_a"]))
    assert set(dataset.classes) < {c.wnid for c in imagenet_classes(SMALL)}
    assert len(dataset.classes) == SMALL.a_classes and len(dataset) == SMALL.a_classes * SMALL.a_per_class
    assert "embedded" in (roots["imagenet_a"] / "README.txt").read_text()


def test_imagenet_9_variants_and_class_mapping(roots: dict[str, Path]) -> None:
    from torchvision.datasets import ImageFolder

    root = roots["imagenet_9"]
    # SMALL holds dog, bird, wheeled vehicle and soccer ball (no super-class)
    expected = ["00_dog", "01_bird", "02_wheeled vehicle"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(IN9_VARIANTS)
    for variant in IN9_VARIANTS:
        dataset = ImageFolder(str(root / variant / "val"))
        assert dataset.classes == expected and len(dataset) == 3 * SMALL.val_per_class
    mapping = json.loads((root / "in_to_in9.json").read_text())
    by_wnid = {c.wnid: mapping[str(i)] for i, c in enumerate(imagenet_classes(SMALL))}
    assert by_wnid == {"n02085620": 0, "n01530575": 1, "n02814533": 2, "n04254680": -1}


def test_imagenet_9_variants_are_composed_from_the_exact_masks(roots: dict[str, Path]) -> None:
    root = roots["imagenet_9"]
    sources = json.loads((root / "mixed_sources.json").read_text())
    files = sorted((root / "original" / "val").rglob("*.JPEG"))
    assert len(files) == 3 * SMALL.val_per_class
    classes = sorted(p.name for p in (root / "original" / "val").iterdir())
    checked = 0
    for path in files:
        rel = path.relative_to(root / "original").as_posix()
        spec, index = _val_sample(path.name)
        layers = imagenet_layers(0, "val", spec, index, SMALL.image_size)
        inside = ndimage.binary_erosion(layers.mask, iterations=2)
        outside = ~ndimage.binary_dilation(layers.mask, iterations=2)
        assert np.abs(_load(path) - _load(roots["imagenet"] / "val" / spec.wnid / path.name)).max() == 0
        assert _load(root / "only_fg" / rel)[outside].mean() < 6
        assert _load(root / "no_fg" / rel)[inside].mean() < 6
        assert np.abs(_load(root / "only_fg" / rel)[inside] - _load(path)[inside]).mean() < 12

        mixed = _load(root / "mixed_same" / rel)
        assert np.abs(mixed[inside] - _load(path)[inside]).mean() < 12  # same foreground
        source = root / sources["mixed_same"][f"mixed_same/{rel}"]
        assert source.parent.name == path.parent.name and source.name != path.name
        src_spec, src_index = _val_sample(source.name)
        ys, xs = np.nonzero(imagenet_layers(0, "val", src_spec, src_index, SMALL.image_size).mask)
        untouched = outside.copy()  # neither our object nor the source's tiled-over box
        untouched[max(ys.min() - 2, 0) : ys.max() + 3, max(xs.min() - 2, 0) : xs.max() + 3] = False
        if untouched.sum() >= 20:
            checked += 1
            assert np.abs(mixed[untouched] - _load(source)[untouched]).mean() < 12

        next_class = sources["mixed_next"][f"mixed_next/{rel}"].split("/")[2]
        assert next_class == classes[(classes.index(path.parent.name) + 1) % len(classes)]
    assert checked >= len(files) // 3


# ---------------------------------------------------------------- corruptions


def test_corruptions_are_seeded_and_shape_preserving() -> None:
    image = imagenet_layers(0, "val", imagenet_classes(SMALL)[0], 0, 32).image
    assert len(CORRUPTIONS) == 19
    for name in CORRUPTIONS:
        a = corrupt(image, name, 5, np.random.default_rng(7))
        b = corrupt(image, name, 5, np.random.default_rng(7))
        assert a.dtype == np.uint8 and a.shape == image.shape, name
        assert np.array_equal(a, b), name
        assert not np.array_equal(a, image), name


# ---------------------------------------------------------------- layout validators


def test_kinds_table_layout_checks_and_builders_agree() -> None:
    from ibot.data import layouts
    from ibot.data.embedded.sets import BUILDERS

    assert KINDS == tuple(DATASET_KINDS) and set(layouts._CHECKS) == set(DATASET_KINDS)
    embedded_kinds = tuple(name for name, kind in DATASET_KINDS.items() if kind.embedded)
    assert embedded.SETS == embedded_kinds and set(BUILDERS) == set(embedded_kinds)
    assert ROOT_NAMES == {name: DATASET_KINDS[name].embedded_root for name in embedded_kinds}
    assert ROOT_NAMES["ade20k"] == "ADEChallengeData2016" and not DATASET_KINDS["imagenet_r"].embedded
    for name, kind in DATASET_KINDS.items():
        assert kind.name == name and kind.config_key == f"data.{name}"
        assert kind.description and "\n" not in kind.description
    with pytest.raises(RuntimeError, match=r"layouts does not match .*DATASET_KINDS: missing \['imagenet_r'\]"):
        check_coverage("layouts", set(DATASET_KINDS) - {"imagenet_r"}, DATASET_KINDS)
    with pytest.raises(RuntimeError, match=r"unknown \['cifar'\]"):
        check_coverage("builders", [*embedded_kinds, "cifar"], embedded_kinds)


def test_validators_accept_generated_sets(roots: dict[str, Path]) -> None:
    for kind in ROOT_NAMES:
        check_layout(kind, roots[kind], config_key=f"data.{kind}")


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def test_validators_accept_real_layouts(tmp_path: Path) -> None:
    _touch(tmp_path / "imagenet-a", "README.txt", "n01498041/0.000116_digital clock _ digital clock_0.865662.jpg")
    check_layout("imagenet_a", tmp_path / "imagenet-a")
    _touch(tmp_path / "bg_challenge", "original/val/00_dog/n02085620_1.JPEG", "mixed_rand/val/00_dog/n02085620_1.JPEG")
    check_layout("imagenet_9", tmp_path / "bg_challenge")
    _touch(tmp_path / "in-c", *(f"fog/{s}/n01440764/ILSVRC2012_val_00000293.JPEG" for s in range(1, 6)))
    check_layout("imagenet_c", tmp_path / "in-c")
    ade = tmp_path / "ADEChallengeData2016"
    _touch(ade, "objectInfo150.txt", "sceneCategories.txt")
    for split, prefix in (("training", "train"), ("validation", "val")):
        _touch(ade, f"images/{split}/ADE_{prefix}_00000001.jpg", f"annotations/{split}/ADE_{prefix}_00000001.png")
    check_layout("ade20k", ade)
    # class-folder sets take every torchvision image suffix (IMG_EXTENSIONS, any case); hidden files are no images
    _touch(tmp_path / "imagenet-r", "n01443537/.art_0.jpg", "n01443537/art_0.WebP")
    check_layout("imagenet_r", tmp_path / "imagenet-r")
    _touch(tmp_path / "hidden", "n01443537/.art_0.jpg")
    with pytest.raises(DatasetLayoutError, match="has no images in 'n01443537/'"):
        check_layout("imagenet_r", tmp_path / "hidden")


def test_validator_messages_name_key_path_and_expectation(roots: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError, match=r"^data\.imagenet: .*nowhere does not exist; expected the ImageNet"):
        check_layout("imagenet", missing, config_key="data.imagenet")

    with pytest.raises(DatasetLayoutError) as info:
        check_layout("imagenet", roots["coco"], config_key="data.imagenet")
    assert str(info.value) == (
        f"data.imagenet: {roots['coco']} has no 'train/' folder; "
        f"expected the ImageNet layout: {DATASET_KINDS['imagenet'].description}"
    )

    flat = tmp_path / "flat"
    _touch(flat, "train/n01440764/a.JPEG", "val/ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetLayoutError, match="sort them into class folders"):
        check_layout("imagenet", flat)

    coco = shutil.copytree(roots["coco"], tmp_path / "coco")
    (coco / "annotations" / "instances_val2017.json").write_text("{broken")
    with pytest.raises(
        DatasetLayoutError, match=r"^data\.coco: \S+ has an unparseable 'annotations/instances_val2017\.json'"
    ):
        check_layout("coco", coco, config_key="data.coco")

    partial_c = tmp_path / "partial_c"
    _touch(partial_c, "fog/1/n01440764/x.JPEG")
    with pytest.raises(DatasetLayoutError, match=r"severity folders \['2', '3', '4', '5'\] in 'fog/'"):
        check_layout("imagenet_c", partial_c, config_key="data.imagenet_c")

    with pytest.raises(DatasetLayoutError, match=r"^\S+ has no 'original/' variant folder"):
        check_layout("imagenet_9", roots["imagenet"])  # no key: message starts with the path
    with pytest.raises(ValueError, match="unknown dataset kind"):
        check_layout("cifar", tmp_path)


# ---------------------------------------------------------------- transfer sets (Tab. 7)

TRANSFER_KINDS = ("cifar10", "cifar100", "inat18", "inat19", "flowers", "cars")


@pytest.mark.parametrize("kind", TRANSFER_KINDS)
def test_transfer_sets_are_read_by_their_loaders(roots: dict[str, Path], kind: str) -> None:
    """The readers of the real sets (ibot.data.transfer_sets, the official eval_cls.py ones) read the
    embedded copies: every class in both splits, images at their size, labels in range."""
    from ibot.data.transfer_sets import read_transfer_set

    for train, per_class in ((True, SMALL.transfer_train_per_class), (False, SMALL.transfer_val_per_class)):
        dataset = read_transfer_set(kind, roots[kind], train=train)
        assert dataset.num_classes == SMALL.transfer_classes, (kind, train)
        assert len(dataset) == SMALL.transfer_classes * per_class
        assert sorted(set(dataset.targets)) == list(range(SMALL.transfer_classes))
        image, label = dataset[0]
        assert image.mode == "RGB" and image.size == (32, 32) and label == dataset.targets[0]


def test_transfer_sets_are_in_the_release_formats(roots: dict[str, Path]) -> None:
    import pickle

    from scipy import io as scio

    with open(roots["cifar10"] / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert set(batch) == {"batch_label", "data", "labels", "filenames"} and batch["data"].dtype == np.uint8
    assert batch["data"].shape[1] == 3 * 32 * 32
    with open(roots["cifar100"] / "cifar-100-python" / "meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["fine_label_names"][:2] == ["apple", "aquarium_fish"]
    train = json.loads((roots["inat18"] / "train2018.json").read_text())
    assert {"images", "annotations", "categories", "info", "licenses"} <= set(train)
    assert train["images"][0]["file_name"].startswith("train_val2018/")
    assert len(json.loads((roots["inat18"] / "categories.json").read_text())) == SMALL.transfer_classes
    assert not (roots["inat19"] / "categories.json").exists()  # as the 2019 release
    setid = scio.loadmat(roots["flowers"] / "setid.mat")
    ids = np.concatenate([setid[k][0] for k in ("trnid", "valid", "tstid")])
    assert sorted(ids) == list(range(1, len(list((roots["flowers"] / "jpg").iterdir())) + 1))
    annotations = scio.loadmat(roots["cars"] / "cars_annos.mat")["annotations"][0]
    assert annotations.dtype.names == ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    first = annotations[0]
    assert (roots["cars"] / first["relative_im_path"].item()).is_file()
    assert 1 <= first["bbox_x1"].item() <= first["bbox_x2"].item() <= 32


def _break(kind: str, root: Path) -> str:
    """Damage a copy of an embedded transfer set; returns the part the error must name."""
    if kind == "cifar10":
        (root / "cifar-10-batches-py" / "data_batch_3").unlink()
        return r"has no \['data_batch_3'\] in 'cifar-10-batches-py/'"
    if kind == "cifar100":
        (root / "cifar-100-python" / "meta").write_bytes(b"not a pickle")
        return r"has an unreadable 'cifar-100-python/meta' \(UnpicklingError: .+\)"
    if kind == "inat18":
        (root / "val2018.json").unlink()
        return r"has no 'val2018\.json'"
    if kind == "inat19":
        (root / "train2019.json").write_text('{"images": []}')
        return r"has 'train2019\.json' without the keys \['annotations', 'categories'\]"
    if kind == "flowers":
        next((root / "jpg").iterdir()).unlink()
        return r"has \d+ images in 'jpg/' but 'imagelabels\.mat' labels \d+"
    (root / "cars_annos.mat").write_bytes(b"garbage" * 20)
    return r"has an unreadable 'cars_annos\.mat' \(.+\)"


@pytest.mark.parametrize("kind", TRANSFER_KINDS)
def test_transfer_layouts_reject_a_broken_copy(roots: dict[str, Path], tmp_path: Path, kind: str) -> None:
    copy = shutil.copytree(roots[kind], tmp_path / roots[kind].name)
    check_layout(kind, copy, config_key=f"data.{kind}")
    problem = _break(kind, copy)
    with pytest.raises(DatasetLayoutError, match=rf"^data\.{kind}: {re.escape(str(copy))} {problem}; expected the "):
        check_layout(kind, copy, config_key=f"data.{kind}")


def test_cifar_layout_points_at_the_torchvision_root(roots: dict[str, Path]) -> None:
    with pytest.raises(DatasetLayoutError, match="it is that folder itself: use its parent"):
        check_layout("cifar10", roots["cifar10"] / "cifar-10-batches-py", config_key="data.cifar10")


def test_imagenet_objects_carry_their_class_hue():
    """Class colour statistics are what makes the embedded set learnable by a few hundred iBOT steps
    (README "Embedded default"): every object's bright shade lies within 0.05 of its class hue."""
    for spec in imagenet_classes(EmbeddedSizes()):
        for index in range(5):
            layers = imagenet_layers(0, "train", spec, index, 64)
            pixels = layers.foreground[layers.mask].astype(float) / 255
            brightest = pixels[pixels.max(1).argmax()]  # bright shade: value >= 0.6, dark one <= 0.35
            hue = colorsys.rgb_to_hsv(*brightest)[0]
            assert min(abs(hue - spec.hue), 1 - abs(hue - spec.hue)) < 0.05, (spec.wnid, index, hue)
    assert len({spec.hue for spec in imagenet_classes(EmbeddedSizes())}) == EmbeddedSizes().classes
