"""MaskGenerator: ratio statistics, ratio list/var semantics, start epoch, determinism, block geometry;
MultiCropMaskedDataset: crop/mask layout and (seed, epoch, index) reproducibility."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ibot.data.masking import MaskGenerator
from ibot.data.multicrop import MultiCropMaskedDataset, collate_multicrop

H = W = 14


def _ratios(gen: MaskGenerator, draws: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([gen(H, W, rng).mean() for _ in range(draws)])


def test_block_ratio_statistics() -> None:
    ratios = _ratios(MaskGenerator(16, 0.3, 0.0), 400)
    # each mask stays within the budget (no rectangle exceeds the remainder) and gets close to it
    assert ratios.max() <= 0.3 + 1e-9
    assert 0.28 < ratios.mean() <= 0.3  # ~0.292 for 14x14


def test_rand_ratio_is_exact() -> None:
    ratios = _ratios(MaskGenerator(16, 0.3, 0.0, pred_shape="rand"), 50)
    assert np.all(ratios == int(0.3 * H * W) / (H * W))  # official int() truncation


def test_rand_positions_are_uniform() -> None:
    gen, rng = MaskGenerator(16, 0.3, 0.0, pred_shape="rand"), np.random.default_rng(1)
    freq = np.mean([gen(H, W, rng) for _ in range(2000)], axis=0)
    assert np.abs(freq - freq.mean()).max() < 0.06


def test_ratio_list_and_variance() -> None:
    gen = MaskGenerator(16, [0.0, 0.3], [0.0, 0.2])
    rng = np.random.default_rng(0)
    drawn = np.array([gen.get_pred_ratio(rng) for _ in range(2000)])
    zeros, jittered = drawn[drawn == 0.0], drawn[drawn != 0.0]
    assert 0.45 < len(zeros) / len(drawn) < 0.55  # one entry picked at random per crop
    assert jittered.min() >= 0.1 and jittered.max() <= 0.5 and abs(jittered.mean() - 0.3) < 0.01
    # scalar variance broadcasts to every ratio; a length-1 list acts as a scalar
    assert MaskGenerator(16, [0.2, 0.4], 0.1).pred_ratio_var == [0.1, 0.1]
    single = MaskGenerator(16, [0.3], [0.1])
    assert all(0.2 <= single.get_pred_ratio(rng) <= 0.4 for _ in range(100))
    with pytest.raises(ValueError):
        MaskGenerator(16, 0.1, 0.2)


def test_mean_ratio_with_variance_block() -> None:
    ratios = _ratios(MaskGenerator(16, 0.3, 0.2), 400, seed=3)
    assert 0.27 < ratios.mean() < 0.31


def test_no_masking_before_start_epoch() -> None:
    for shape in ("block", "rand"):
        gen, rng = MaskGenerator(16, 0.5, 0.1, pred_shape=shape, pred_start_epoch=2), np.random.default_rng(0)
        assert gen(H, W, rng).any()  # official: before set_epoch the start epoch is not enforced
        gen.set_epoch(1)
        mask = gen(H, W, rng)
        assert mask.shape == (H, W) and mask.dtype == bool and not mask.any()
        gen.set_epoch(2)
        assert gen(H, W, rng).any()


def test_deterministic_for_same_seed() -> None:
    for shape in ("block", "rand"):
        gen = MaskGenerator(16, [0.1, 0.4], [0.0, 0.1], pred_shape=shape)
        first = [gen(H, W, np.random.default_rng(7)) for _ in range(3)]
        rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
        assert all(np.array_equal(gen(H, W, rng_a), gen(H, W, rng_b)) for _ in range(20))
        assert all(np.array_equal(first[0], m) for m in first[1:])


def test_block_masks_are_unions_of_rectangles() -> None:
    gen, rng = MaskGenerator(16, 0.4, 0.0), np.random.default_rng(5)
    for height, width in [(14, 14), (12, 9), (6, 6)]:
        for _ in range(30):
            budget = 0.4 * height * width
            mask, rectangles = gen.block_mask(height, width, budget, rng)
            union = np.zeros((height, width), dtype=bool)
            for top, left, h, w in rectangles:
                # inside the grid and strictly smaller than it (official ``w < W and h < H``)
                assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
                assert 1 <= h < height and 1 <= w < width
                assert not union[top: top + h, left: left + w].all()  # each rectangle adds patches
                union[top: top + h, left: left + w] = True
            assert np.array_equal(mask, union) and union.sum() <= budget


class _Images(torch.utils.data.Dataset):
    def __init__(self, count: int) -> None:
        gen = np.random.default_rng(0)
        self.images = [Image.fromarray(gen.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], index % 2


def _dataset(**kwargs) -> MultiCropMaskedDataset:
    args = dict(global_crops_size=32, local_crops_size=16, local_crops_number=2, patch_size=8, pred_ratio=0.3,
                seed=1)
    args.update(kwargs)
    return MultiCropMaskedDataset(_Images(4), **args)


def test_dataset_layout_and_collate() -> None:
    dataset = _dataset()
    crops, label, masks = dataset[1]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2 and label == 1
    assert len(masks) == 2 and all(m.shape == (4, 4) and m.dtype == torch.bool for m in masks)
    images, labels, batch_masks = collate_multicrop([dataset[i] for i in range(3)])
    assert [tuple(x.shape) for x in images] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert labels.tolist() == [0, 1, 0] and [tuple(m.shape) for m in batch_masks] == [(3, 4, 4)] * 2


def test_dataset_replays_given_seed_epoch_index() -> None:
    def sample(dataset, index):
        crops, _, masks = dataset[index]
        return torch.cat([c.flatten() for c in crops]), torch.stack(masks)

    first, second = _dataset(), _dataset()
    first.set_epoch(3)
    second.set_epoch(3)
    torch.manual_seed(123)
    random.seed(123)
    a = sample(first, 2)
    state_torch, state_py = torch.get_rng_state(), random.getstate()
    _ = sample(first, 0)  # other samples in between must not matter
    assert torch.equal(torch.get_rng_state(), state_torch) and random.getstate() == state_py  # globals restored
    b = sample(second, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    second.set_epoch(4)
    assert not torch.equal(sample(second, 2)[0], a[0])
    # worker processes give the same batches as the main process
    loader = lambda workers: list(DataLoader(first, batch_size=2, num_workers=workers, collate_fn=collate_multicrop))
    for (x0, _, m0), (x1, _, m1) in zip(loader(0), loader(2)):
        assert all(torch.equal(u, v) for u, v in zip(x0 + m0, x1 + m1))


def test_dataset_masks_empty_before_start_epoch() -> None:
    dataset = _dataset(pred_start_epoch=2, pred_shape="rand")
    dataset.set_epoch(0)
    assert not any(m.any() for m in dataset[0][2])
    dataset.set_epoch(2)
    assert all(m.sum() == int(0.3 * 16) for m in dataset[0][2])
