"""The batched multi-crop pipeline (``augmentation: fast | gpu``) against the official PIL transforms.

Not bitwise (floats instead of uint8 rounding, a true Gaussian instead of Pillow's box passes, JPEG
DCT scaling), so the checks are: the same random draws as the official ``Compose`` (crop boxes, flips,
jitter order and factors, blur radii, solarization: views agree pixel for pixel within rounding), each
photometric operation against its PIL counterpart on fixed images, draw frequencies against the
recipe, masks unchanged, batched = per sample = the GPU path's arithmetic, exact replay, and the
workflow's resolved config reaching the trainer.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from ibot.config import load_yaml, stage_config, validate_config
from ibot.data import batched_augment as B
from ibot.data.embedded.render import photo_like
from ibot.data.multicrop import (DataAugmentationIBOT, MultiCropMaskedDataset, PendingViews, _SeededGlobalRNGs,
                                 collate_multicrop)

ROOT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor(B.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(B.IMAGENET_STD).view(3, 1, 1)
CROPS = dict(global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.4), global_crops_number=2,
             local_crops_number=6, global_crops_size=96, local_crops_size=48)


def _recipes() -> list[B.ViewRecipe]:
    return B.ibot_view_recipes(**CROPS)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """Six photo-like JPEGs (ImageNet-like 4:3, quality 90) in an ImageFolder layout."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for index in range(6):
        path = root / "train" / f"c{index % 2}" / f"{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, 150, 200)).save(path, format="JPEG", quality=90)
    return root / "train"


def _unnormalize(view: torch.Tensor) -> torch.Tensor:
    return view * STD + MEAN


def _official_views(image: Image.Image, seeds: tuple[int, int]) -> list[torch.Tensor]:
    with _SeededGlobalRNGs(*seeds):
        return DataAugmentationIBOT(**CROPS)(image)


def _fast_views(source, seeds: tuple[int, int], on_cpu: bool) -> list[torch.Tensor]:
    """The views of the ``fast`` path (OpenCV in the worker, ``on_cpu``) or of the ``gpu`` path (torch)."""
    with _SeededGlobalRNGs(*seeds):
        pending = B.FastMultiCrop(_recipes(), photometric_on_cpu=on_cpu)(source)
    return pending.finish("cpu")


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((_unnormalize(a) - _unnormalize(b)).abs().mean())


@pytest.mark.parametrize("on_cpu", [True, False], ids=["fast-opencv", "gpu-path-torch"])
def test_views_are_the_official_views_draw_for_draw(jpeg_folder, on_cpu):
    """Same seeds -> same crops, flips, jitter, blur and solarization: every view agrees with the
    official one within rounding (< 2/255 on average); another seed's views do not (> 10/255)."""
    files = sorted(jpeg_folder.rglob("*.jpg"))
    for index, path in enumerate(files[:4]):
        image = Image.open(path).convert("RGB")
        for seeds in ((index, 100 + index), (7 * index + 3, 5)):
            official = _official_views(image, seeds)
            for source in (path, image):  # the file (torchvision's JPEG decoder) or a decoded PIL image
                fast = _fast_views(source, seeds, on_cpu)
                assert [v.shape for v in fast] == [v.shape for v in official]
                errors = [_mean_abs(a, b) for a, b in zip(official, fast)]
                assert max(errors) < 2 / 255, (path.name, seeds, errors)
        other = _fast_views(path, (999, 999), on_cpu)
        assert np.mean([_mean_abs(a, b) for a, b in zip(official, other)]) > 10 / 255


def test_opencv_and_torch_photometric_paths_agree(jpeg_folder):
    """``fast`` (OpenCV, uint8) and ``gpu`` (torch, float) apply the same draws: views within rounding."""
    for index, path in enumerate(sorted(jpeg_folder.rglob("*.jpg"))[:3]):
        cpu, device = _fast_views(path, (index, 1), True), _fast_views(path, (index, 1), False)
        assert max(_mean_abs(a, b) for a, b in zip(cpu, device)) < 1.5 / 255


def test_crop_boxes_come_from_random_resized_crop_itself():
    """The crop sampler is torchvision's: boxes equal ``RandomResizedCrop.get_params`` draw for draw
    (so scale, aspect and position distributions are identical), whatever the other draws in between."""
    image = Image.new("RGB", (500, 375))
    recipe = _recipes()[-1]
    with _SeededGlobalRNGs(1, 2):
        draws = [B.sample_view(recipe, image) for _ in range(200)]
    with _SeededGlobalRNGs(1, 2):
        expected = []
        for _ in range(200):
            expected.append(transforms.RandomResizedCrop.get_params(image, list(recipe.scale), list(recipe.ratio)))
            torch.rand(1), torch.rand(1)  # flip, RandomApply
            if expected and draws[len(expected) - 1].jitter:
                transforms.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
            torch.rand(1), random.random()  # grayscale, blur
            if draws[len(expected) - 1].blur_sigma:
                random.random()
    assert [d.box for d in draws] == [tuple(b) for b in expected]
    areas = np.array([h * w for _, _, h, w in (d.box for d in draws)]) / (500 * 375)
    assert areas.min() >= recipe.scale[0] - 1e-3 and areas.max() <= recipe.scale[1] + 1e-3


@pytest.mark.parametrize("recipe_index", [0, 1, 2])
def test_draw_frequencies_match_the_recipe(recipe_index):
    recipe = _recipes()[recipe_index]
    image = Image.new("RGB", (200, 150))
    n = 4000
    with _SeededGlobalRNGs(3, 4):
        draws = [B.sample_view(recipe, image) for _ in range(n)]

    def close(observed: float, p: float) -> bool:
        return abs(observed - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9

    jittered = [d for d in draws if d.jitter]
    assert close(np.mean([d.flip for d in draws]), B.FLIP_P)
    assert close(len(jittered) / n, B.JITTER_P)
    assert close(np.mean([d.gray for d in draws]), B.GRAY_P)
    assert close(np.mean([d.blur_sigma > 0 for d in draws]), recipe.blur_p)
    assert close(np.mean([d.solarize for d in draws]), recipe.solarize_p)
    sigmas = [d.blur_sigma for d in draws if d.blur_sigma]
    assert min(sigmas) >= B.BLUR_RADIUS[0] and max(sigmas) <= B.BLUR_RADIUS[1]
    factors = np.array([d.jitter_factors for d in jittered])
    assert factors[:, 0].min() >= 0.6 and factors[:, 0].max() <= 1.4 and abs(factors[:, 3]).max() <= 0.1
    assert len({d.jitter_order for d in jittered}) == 24  # every order of the four ops occurs


@pytest.fixture(scope="module")
def fixed_image() -> Image.Image:
    return Image.fromarray(photo_like(np.random.default_rng(1), 96, 96))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("op,pil_op,factors", [
    (B._brightness, TF.adjust_brightness, (0.6, 0.9, 1.4)),
    (B._contrast, TF.adjust_contrast, (0.6, 1.4)),
    (B._saturation, TF.adjust_saturation, (0.8, 1.2)),
    (B._hue, TF.adjust_hue, (-0.1, -0.03, 0.05, 0.1)),
])
def test_each_colour_operation_matches_pil(fixed_image, op, pil_op, factors):
    """Both implementations (torch float: ``gpu`` path; OpenCV uint8: ``fast`` path) of each colour op
    against torchvision's PIL op with the same factor."""
    x = _tensor(fixed_image)
    op_index = B._JITTER_OPS.index(op)
    for factor in factors:
        reference = _tensor(pil_op(fixed_image, factor))
        order, factors4 = [op_index, *[i for i in range(4) if i != op_index]], [1.0, 1.0, 1.0, 0.0]
        factors4[op_index] = factor
        draw = B.ViewDraw((0, 0, 96, 96), False, True, tuple(order), tuple(factors4), False, 0.0, False)
        opencv = _tensor(Image.fromarray(B.photometric_uint8(np.array(fixed_image), draw)))
        for ours in (op(x.clone(), torch.tensor([factor])), opencv):
            difference = (reference - ours).abs()
            assert float(difference.mean()) < 1 / 255, (factor, float(difference.mean()) * 255)
            assert float(difference.max()) <= 10 / 255  # PIL quantises the hue shift to 1/255 of a turn
            assert abs(float(ours.std() / reference.std()) - 1) < 0.01


def test_grayscale_solarize_and_blur_match_pil(fixed_image):
    x = _tensor(fixed_image)
    gray = _tensor(TF.rgb_to_grayscale(fixed_image, num_output_channels=3))
    assert float((B._grayscale(x) - gray).abs().mean()) < 0.5 / 255
    assert torch.allclose(B._solarize(x), _tensor(ImageOps.solarize(fixed_image)), atol=1e-6, rtol=0)

    def sharpness(t: torch.Tensor) -> float:  # std of horizontal differences: what a blur removes
        return float((t[..., 1:] - t[..., :-1]).std())

    for radius in (0.1, 0.5, 1.0, 1.5, 2.0):
        reference = _tensor(fixed_image.filter(ImageFilter.GaussianBlur(radius)))
        draw = B.ViewDraw((0, 0, 96, 96), False, False, (0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0), False, radius, False)
        opencv = _tensor(Image.fromarray(B.photometric_uint8(np.array(fixed_image), draw)))
        for ours in (B._gaussian_blur(x.clone(), torch.tensor([radius])), opencv):
            assert float((reference - ours).abs().mean()) < 1 / 255, radius
            assert abs(sharpness(ours) / sharpness(reference) - 1) < 0.05, radius
    gray_draw = B.ViewDraw((0, 0, 96, 96), False, False, (0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0), True, 0.0, True)
    opencv = _tensor(Image.fromarray(B.photometric_uint8(np.array(fixed_image), gray_draw)))
    assert float((opencv - _tensor(ImageOps.solarize(TF.rgb_to_grayscale(fixed_image, 3)))).abs().mean()) < 0.5 / 255


def test_batched_views_equal_per_sample_views_and_replay_exactly(jpeg_folder):
    """One batched pass (the workers' ``fast`` path and the GPU path's arithmetic) = per-sample passes;
    a sample is a function of (seed, epoch, index) only; masks are the official loader's."""
    fast = MultiCropMaskedDataset(jpeg_folder, **CROPS, patch_size=16, pred_ratio=[0.0, 0.3],
                                  pred_ratio_var=[0.0, 0.2], augmentation="gpu", seed=5)
    official = MultiCropMaskedDataset(jpeg_folder, **CROPS, patch_size=16, pred_ratio=[0.0, 0.3],
                                      pred_ratio_var=[0.0, 0.2], seed=5)
    fast.set_epoch(2)
    official.set_epoch(2)
    samples = [fast[i] for i in range(4)]
    assert all(isinstance(s[0], PendingViews) for s in samples)
    batched, labels, masks = collate_multicrop(samples, finish=True)
    for i, (pending, label, sample_masks) in enumerate(samples):
        views = pending.finish("cpu")
        assert all(torch.equal(batched[v][i], views[v]) for v in range(len(views)))
        official_views, official_label, official_masks = official[i]
        assert label == official_label
        assert all(torch.equal(a, b) for a, b in zip(sample_masks, official_masks))
        assert max(_mean_abs(a, b) for a, b in zip(official_views, views)) < 2 / 255
    replay = collate_multicrop([fast[i] for i in range(4)], finish=True)[0]
    assert all(torch.equal(a, b) for a, b in zip(batched, replay))
    pending_batch = collate_multicrop(samples)[0]
    assert isinstance(pending_batch, PendingViews) and pending_batch.crops[0].dtype == torch.uint8
    assert all(torch.equal(a, b) for a, b in zip(pending_batch.finish("cpu"), batched))
    # the fast path: photometric ops in the sample (OpenCV), the batch only normalised by the collate
    fast_cpu = MultiCropMaskedDataset(jpeg_folder, **CROPS, patch_size=16, pred_ratio=[0.0, 0.3],
                                      pred_ratio_var=[0.0, 0.2], augmentation="fast", seed=5)
    fast_cpu.set_epoch(2)
    cpu_samples = [fast_cpu[i] for i in range(4)]
    cpu_batch = collate_multicrop(cpu_samples, finish=True)[0]
    for i, sample in enumerate(cpu_samples):
        assert sample[0].photometric_done
        assert all(torch.equal(cpu_batch[v][i], view) for v, view in enumerate(sample[0].finish("cpu")))
        assert max(_mean_abs(cpu_batch[v][i], batched[v][i]) for v in range(len(batched))) < 1.5 / 255
    assert all(torch.equal(a, b) for a, b in zip(cpu_batch, collate_multicrop(
        [fast_cpu[i] for i in range(4)], finish=True)[0]))


def test_jpeg_dct_scaling_is_used_when_every_crop_allows_it(tmp_path):
    """A large JPEG whose crops are all downscaled >= 2x decodes at reduced size; the views stay the
    official ones within resampling differences."""
    path = tmp_path / "large.jpg"
    Image.fromarray(photo_like(np.random.default_rng(2), 600, 800)).save(path, format="JPEG", quality=90)
    recipes = [B.ViewRecipe(64, (0.5, 1.0), 0.0, 0.0), B.ViewRecipe(64, (0.5, 1.0), 0.0, 0.0)]
    with _SeededGlobalRNGs(0, 0):
        draws = [B.sample_view(r, Image.open(path)) for r in recipes]
    assert B.draft_factor([d.box for d in draws], [64, 64]) == 4  # boxes >= 554 px: 554 / 4 >= 2 x 64
    with _SeededGlobalRNGs(0, 0):
        pending = B.FastMultiCrop(recipes)(path)
    fast, params = pending.finish("cpu"), pending.params
    image = Image.open(path).convert("RGB")
    for row, (draw, view) in enumerate(zip(draws, fast)):
        top, left, height, width = draw.box
        full_size_crop = torch.from_numpy(np.array(TF.resized_crop(
            image, top, left, height, width, [64, 64], TF.InterpolationMode.BICUBIC))).permute(2, 0, 1)
        reference = B.apply_photometric(full_size_crop[None], params.rows(row, row + 1))[0]
        assert _mean_abs(view, reference) < 3 / 255, row  # resampling, and box edges on the reduced grid
        sharpness = [float((v[..., 1:] - v[..., :-1]).std()) for v in (view, reference)]
        assert abs(sharpness[0] / sharpness[1] - 1) < 0.05, (row, sharpness)


def test_resolved_config_selects_the_augmentation_and_the_trainer_finishes_on_its_device(jpeg_folder, tmp_path):
    from ibot.stages import stage_defaults
    from ibot.train.pretrain import Trainer

    config = load_yaml(ROOT / "config" / "paper.yaml")
    assert stage_config(validate_config(load_yaml(ROOT / "config" / "paper.yaml"), base_dir=ROOT), "pretrain",
                        "vit_small")["augmentation"] == "official"
    embedded = validate_config(load_yaml(ROOT / "config" / "config.yaml"), base_dir=ROOT)
    assert stage_config(embedded, "pretrain", "vit_tiny")["augmentation"] == "fast"  # what the e2e DAG runs
    config["models"]["vit_small"].setdefault("overrides", {}).setdefault("pretrain", {})["augmentation"] = "gpu"
    resolved = stage_config(validate_config(config, base_dir=ROOT), "pretrain", "vit_small")
    assert resolved["augmentation"] == "gpu"
    bad = load_yaml(ROOT / "config" / "paper.yaml")
    bad["models"]["vit_small"].setdefault("overrides", {}).setdefault("pretrain", {})["augmentation"] = "dali"
    with pytest.raises(Exception, match="augmentation"):
        validate_config(bad, base_dir=ROOT)

    tiny = {**stage_defaults("pretrain"), "epochs": 1, "batch_size_per_gpu": 2, "global_crops_size": 32, "local_crops_size": 16,
            "local_crops_number": 2, "num_workers": 0, "out_dim": 64, "patch_out_dim": 64, "warmup_epochs": 0,
            "warmup_teacher_temp_epochs": 0, "shared_head": False, "precision": "fp32",
            "augmentation": resolved["augmentation"]}
    trainer = Trainer(tiny, {"arch": "vit_tiny", "patch_size": 8, "depth": 1}, jpeg_folder, tmp_path)
    images, _, masks = next(iter(trainer._loader(0)))
    assert isinstance(images, PendingViews)
    stats = trainer.train_step(images, masks, 0, 0)
    assert math.isfinite(stats["loss"])
