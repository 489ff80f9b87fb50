"""cbam_train.data.datasets: stratified splits, synthetic data, loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbam_train.data.datasets import (
    DataError,
    ImageDataset,
    build_splits,
    make_loader,
    make_synthetic,
    stratified_split,
    stratified_subset,
)

# ---------------------------------------------------------------- stratified_split / stratified_subset

# Unequal classes: 0 -> 50, 1 -> 30, 2 -> 15, 3 -> 5 (n = 100), shuffled so classes are interleaved.
UNEQUAL = np.random.default_rng(123).permutation(np.repeat([0, 1, 2, 3], [50, 30, 15, 5]))


@pytest.mark.parametrize("val_size", [1, 7, 10, 33, 99])
def test_stratified_split_exact_size_proportional_and_partition(val_size):
    labels = UNEQUAL
    n = len(labels)
    train, val = stratified_split(labels, val_size, seed=0)
    assert len(val) == val_size
    assert len(train) == n - val_size
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    assert list(val) == sorted(val) and list(train) == sorted(train)
    for c, count in zip(*np.unique(labels, return_counts=True), strict=True):
        quota = count * val_size / n
        got = int((labels[val] == c).sum())
        assert abs(got - quota) < 1, (c, got, quota)


def test_stratified_split_deterministic_per_seed():
    a_train, a_val = stratified_split(UNEQUAL, 20, seed=5)
    b_train, b_val = stratified_split(UNEQUAL, 20, seed=5)
    np.testing.assert_array_equal(a_val, b_val)
    np.testing.assert_array_equal(a_train, b_train)
    _, c_val = stratified_split(UNEQUAL, 20, seed=6)
    assert set(c_val.tolist()) != set(a_val.tolist())
    # the per-class counts do not depend on the seed, only which images
    np.testing.assert_array_equal(np.bincount(UNEQUAL[a_val], minlength=4), np.bincount(UNEQUAL[c_val], minlength=4))


def test_stratified_split_seed_zero_is_a_seed():
    _, v0 = stratified_split(UNEQUAL, 20, seed=0)
    _, v1 = stratified_split(UNEQUAL, 20, seed=1)
    assert set(v0.tolist()) != set(v1.tolist())


def test_stratified_split_val_size_zero():
    train, val = stratified_split(UNEQUAL, 0, seed=0)
    assert len(val) == 0
    assert train.tolist() == list(range(len(UNEQUAL)))


@pytest.mark.parametrize("val_size", [100, 101, 5000])
def test_stratified_split_val_size_too_large(val_size):
    with pytest.raises(DataError, match=rf"data\.val_size={val_size}.*100"):
        stratified_split(UNEQUAL, val_size, seed=0)


def test_stratified_subset_keeps_proportions():
    labels = UNEQUAL
    indices = np.arange(10, 100, dtype=np.int64)  # a subset of the pool, not starting at 0
    keep = stratified_subset(indices, labels, limit=30, seed=0)
    assert len(keep) == 30
    assert len(set(keep.tolist())) == 30
    assert set(keep.tolist()) <= set(indices.tolist())
    classes, counts = np.unique(labels[indices], return_counts=True)
    for c, count in zip(classes, counts, strict=True):
        quota = count * 30 / len(indices)
        assert abs(int((labels[keep] == c).sum()) - quota) < 1
    np.testing.assert_array_equal(keep, stratified_subset(indices, labels, limit=30, seed=0))


def test_stratified_subset_no_limit_or_large_limit_returns_input():
    indices = np.arange(5, 60)
    assert stratified_subset(indices, UNEQUAL, None, seed=0) is indices
    np.testing.assert_array_equal(stratified_subset(indices, UNEQUAL, 1000, seed=0), indices)


# ---------------------------------------------------------------- synthetic

def _class_means(x: torch.Tensor, y: np.ndarray, k: int) -> np.ndarray:
    f = x.float().mean((2, 3)).numpy()  # per-image mean colour, (N, 3), 0..255
    return np.stack([f[y == c].mean(0) for c in range(k)])


def test_synthetic_deterministic_and_seeded():
    x1, y1 = make_synthetic(200, 10, 16, seed=3, sample_seed=4)
    x2, y2 = make_synthetic(200, 10, 16, seed=3, sample_seed=4)
    assert x1.dtype == torch.uint8 and tuple(x1.shape) == (200, 3, 16, 16) and y1.dtype == np.int64
    assert torch.equal(x1, x2) and np.array_equal(y1, y2)
    x3, _ = make_synthetic(200, 10, 16, seed=5, sample_seed=4)
    assert not torch.equal(x1, x3)
    x4, y4 = make_synthetic(200, 10, 16, seed=3, sample_seed=6)
    assert not torch.equal(x1, x4) and not np.array_equal(y1, y4)


def test_synthetic_splits_share_class_prototypes():
    x, y = make_synthetic(400, 10, 16, seed=0, sample_seed=1)
    sx, sy = make_synthetic(200, 10, 16, seed=0, sample_seed=2)
    assert np.bincount(y, minlength=10).min() >= 35 and np.bincount(sy, minlength=10).min() >= 15
    diff = np.abs(_class_means(x, y, 10) - _class_means(sx, sy, 10))
    assert diff.max() < 0.05 * 255
    # another `seed` draws other prototypes
    ox, oy = make_synthetic(200, 10, 16, seed=1, sample_seed=2)
    assert np.abs(_class_means(x, y, 10) - _class_means(ox, oy, 10)).max() > 0.05 * 255


def test_synthetic_is_learnable_by_mean_colour():
    x, y = make_synthetic(500, 10, 16, seed=0, sample_seed=1)
    sx, sy = make_synthetic(300, 10, 16, seed=0, sample_seed=2)
    mu = _class_means(x, y, 10)
    f = sx.float().mean((2, 3)).numpy()
    pred = ((f[:, None, :] - mu[None]) ** 2).sum(-1).argmin(1)
    assert (pred == sy).mean() > 0.5


def test_synthetic_build_splits(make_cfg):
    cfg = make_cfg(["data=synthetic", "data.train_size=100", "data.test_size=40", "data.val_size=20",
                    "data.image_size=8"])
    splits = build_splits(cfg.data, 0, num_classes=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 40)
    assert splits.classes == [f"class{i}" for i in range(10)]
    assert tuple(splits.train[0][0].shape) == (3, 8, 8)
    assert all(0.0 < m < 1.0 for m in splits.mean) and all(0.0 < s < 0.5 for s in splits.std)
    with pytest.raises(DataError, match="model.num_classes=10"):
        build_splits(cfg.data, 0, num_classes=5)


# ---------------------------------------------------------------- loaders

def _order(loader) -> list:
    return [int(v) for _, yb in loader for v in yb]


def test_make_loader_train_order_reproducible_per_seed():
    labels = np.arange(64)  # label == index, so the batches show the order
    ds = ImageDataset(lambda i: torch.zeros(3, 2, 2, dtype=torch.uint8), labels, np.arange(64))
    a = _order(make_loader(ds, 8, train=True, num_workers=0, seed=0))
    b = _order(make_loader(ds, 8, train=True, num_workers=0, seed=0))
    c = _order(make_loader(ds, 8, train=True, num_workers=0, seed=1))
    assert sorted(a) == list(range(64))
    assert a == b
    assert a != c and a != list(range(64))
    # an evaluation loader keeps the dataset order
    assert _order(make_loader(ds, 8, train=False, num_workers=0, seed=0)) == list(range(64))
    # epochs differ from each other but the sequence of epochs is reproducible
    la, lb = make_loader(ds, 8, True, 0, seed=2), make_loader(ds, 8, True, 0, seed=2)
    ea, eb = [_order(la) for _ in range(2)], [_order(lb) for _ in range(2)]
    assert ea == eb and ea[0] != ea[1]


def test_training_loader_drops_a_last_batch_of_one():
    """BatchNorm cannot train on one sample (1x1 maps in layer4): such a remainder is dropped, others kept."""
    labels = np.zeros(9, dtype=np.int64)
    ds = ImageDataset(lambda i: torch.zeros(3, 2, 2, dtype=torch.uint8), labels, np.arange(9))
    assert [len(y) for _, y in make_loader(ds, 4, True, 0, 0)] == [4, 4]
    assert [len(y) for _, y in make_loader(ds, 4, False, 0, 0)] == [4, 4, 1]  # evaluation sees every image
    assert [len(y) for _, y in make_loader(ds, 5, True, 0, 0)] == [5, 4]
