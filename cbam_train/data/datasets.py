"""Datasets (CIFAR-10 pickle batches, image folders, synthetic), stratified splits and loaders.

Every source yields uint8 images of shape (3, H, W) and int labels; augment.py turns them into
float, normalised tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from cbam_train.config.errors import ConfigError, DataError
from cbam_train.config.schema import DataConfig
from cbam_train.data.cifar10 import load_cifar10
from cbam_train.data.imagefolder import ImageFiles, scan_image_folder  # noqa: F401 DataError re-exported


class ImageDataset(Dataset):
    """Images by index (uint8 (3, H, W)) with int labels, through an optional transform.

    `materialize` returns the whole split as one uint8 (N, 3, H, W) tensor (for the in-memory loader),
    through `load.take(indices)` when the source has it (TensorImages, ImageFiles), else by stacking.
    """

    def __init__(self, load: Callable[[int], Optional[torch.Tensor]], labels: np.ndarray, indices: np.ndarray,
                 transform: Optional[Callable] = None) -> None:
        self.load, self.labels, self.indices, self.transform = load, labels, indices, transform

    def materialize(self) -> tuple:
        """(uint8 images (N, 3, H, W), int64 labels (N,)) of this split, in index order."""
        take = getattr(self.load, "take", None)
        if take is not None:
            images = take(self.indices)
        else:  # cast: only image files can give None (unreadable, bad_images=skip), and they have take
            images = torch.stack(cast("list[torch.Tensor]", [self.load(int(i)) for i in self.indices]))
        labels = torch.from_numpy(self.labels[self.indices])
        bad = getattr(self.load, "bad", None)  # unreadable images left out (data.bad_images=skip)
        if bad:
            keep = torch.as_tensor([int(i) not in bad for i in self.indices], dtype=torch.bool)
            images, labels = images[keep], labels[keep]
        return images, labels

    def nbytes(self) -> int:
        """Decoded size of this split in bytes (from one image)."""
        if not len(self):
            return 0
        size = getattr(self.load, "image_size", None)  # image files: known without decoding one
        if size:
            return len(self) * (3 * size * size)
        first = self.load(int(self.indices[0]))
        assert first is not None  # only image files can be unreadable, and they know their size
        return len(self) * first.numel()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        """i, or (i, seed) from SeededOrder: the transform's random draws then come from that seed alone."""
        i, seed = i if isinstance(i, tuple) else (i, None)
        j = int(self.indices[i])
        img = self.load(j)
        if img is None:  # an unreadable image under data.bad_images=skip; skip_none_collate drops it
            return None
        if self.transform is None:
            return img, int(self.labels[j])
        if seed is None:
            return self.transform(img), int(self.labels[j])
        with torch.random.fork_rng(devices=[]):  # leave the process's own RNG as it was (num_workers=0)
            torch.default_generator.manual_seed(seed)
            return self.transform(img), int(self.labels[j])

    def targets(self) -> np.ndarray:
        return self.labels[self.indices]


@dataclass
class DataSplits:
    train: ImageDataset
    val: ImageDataset
    test: Optional[ImageDataset]
    classes: list
    mean: tuple  # per channel, fraction of 255
    std: tuple


# ---------------------------------------------------------------- splits

def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple:
    """Deterministic stratified hold-out: (train_idx, val_idx), disjoint, each sorted.

    Each class gives val_size * (its share) images (largest remainders make the total exact).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training images (the split has {n}); lower it")
    if val_size == 0:
        return np.arange(n), np.arange(0)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * val_size / n
    take = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - take), kind="stable")[: val_size - take.sum()]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    val = []
    for c, k in zip(classes, take, strict=True):
        idx = np.flatnonzero(labels == c)
        val.append(rng.permutation(idx)[:k])
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(n, bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def stratified_subset(indices: np.ndarray, labels: np.ndarray, limit: Optional[int], seed: int) -> np.ndarray:
    """At most `limit` of `indices`, keeping class proportions (for data.limit)."""
    if limit is None or limit >= len(indices):
        return indices
    _, keep = stratified_split(labels[indices], limit, seed + 1)
    return indices[keep]


# ---------------------------------------------------------------- synthetic

def make_synthetic(n: int, num_classes: int, image_size: int, seed: int, sample_seed: int) -> tuple:
    """Learnable fake images: class c has its own colour and stripe orientation/frequency (drawn from
    `seed`, shared by every split), plus per-image noise and phase (from `sample_seed`), so a model has
    to look at both colour and texture. Returns (uint8 (N, 3, S, S), int64 labels)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, 1, 1, generator=g) * 0.6 + 0.2
    angle = torch.rand(num_classes, generator=g) * torch.pi
    freq = 0.4 + torch.rand(num_classes, generator=g) * 0.8  # radians per pixel
    g = torch.Generator().manual_seed(sample_seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    yy, xx = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    shift = torch.rand(n, 1, 1, generator=g) * 2 * torch.pi
    a, f = angle[labels].view(n, 1, 1), freq[labels].view(n, 1, 1)
    stripes = torch.sin(f * (xx * torch.cos(a) + yy * torch.sin(a)) + shift)  # (n, S, S)
    img = colours[labels] + 0.25 * stripes.unsqueeze(1) + 0.12 * torch.randn(n, 3, image_size, image_size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels.numpy().astype(np.int64)


# ---------------------------------------------------------------- assembly

def channel_stats(images: torch.Tensor) -> tuple:
    """Per-channel mean and std (fractions of 255) of uint8 images (N, 3, H, W)."""
    x = images.float().div_(255).transpose(0, 1).reshape(3, -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


class TensorImages:
    """Images held in one uint8 tensor (N, 3, H, W); a picklable `load` (and `take`) for DataLoader workers."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __call__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def take(self, idx: np.ndarray) -> torch.Tensor:
        return self.images[torch.as_tensor(idx, dtype=torch.long)]


def _root(cfg: DataConfig) -> str:
    """data.root, which validate() requires for the datasets read from disk; None here: validate() was skipped."""
    if cfg.root is None:
        raise ConfigError(f"data.root is required for data={cfg.name}; pass data.root=PATH")
    return cfg.root


def build_splits(cfg: DataConfig, seed: int, num_classes: int,
                 warn: Callable[[str], None] = lambda s: None) -> DataSplits:
    """Train / val / test datasets (without transforms) for a DataConfig, checked against num_classes."""
    test = None
    train_load: TensorImages | ImageFiles
    if cfg.name == "cifar10":
        tx, ty, sx, sy, classes = load_cifar10(_root(cfg), cfg.download)
        x, labels = torch.from_numpy(tx), ty
        train_load = TensorImages(x)
        test = ImageDataset(TensorImages(torch.from_numpy(sx)), sy, np.arange(len(sy)))
    elif cfg.name == "synthetic":
        x, labels = make_synthetic(cfg.train_size, cfg.num_classes, cfg.image_size, seed, seed + 1)
        sx, sy = make_synthetic(cfg.test_size, cfg.num_classes, cfg.image_size, seed, seed + 2)
        train_load, classes = TensorImages(x), [f"class{i}" for i in range(cfg.num_classes)]
        test = ImageDataset(TensorImages(sx), sy, np.arange(len(sy)))
    elif cfg.name == "imagefolder":
        root = Path(_root(cfg))
        if not root.is_dir():
            raise DataError(f"data.root={cfg.root}: folder not found")
        paths, labels, classes, ignored = scan_image_folder(root / "train")
        if len(classes) < 2:
            raise DataError(f"data=imagefolder: {root / 'train'} has one class folder ({classes[0]}); a classifier "
                            f"needs at least 2 classes")
        train_load = ImageFiles(paths, cfg.image_size, cfg.bad_images)
        if (root / "test").is_dir():
            tpaths, tlabels, tclasses, tignored = scan_image_folder(root / "test")
            if tclasses != classes:
                raise DataError(f"data=imagefolder: {root / 'test'} classes {tclasses} differ from train's {classes}")
            test = ImageDataset(ImageFiles(tpaths, cfg.image_size, cfg.bad_images), tlabels, np.arange(len(tlabels)))
            ignored += tignored
        if ignored:
            warn(f"data=imagefolder: ignored {ignored} non-image file(s) under {root}")
    else:
        raise DataError(f"data.name: unknown dataset {cfg.name!r}; choose one of: cifar10, imagefolder, synthetic")
    if len(classes) != num_classes:
        raise DataError(f"data has {len(classes)} classes ({', '.join(classes[:12])}) but model.num_classes="
                        f"{num_classes}; set model.num_classes={len(classes)}")
    if cfg.limit is not None and cfg.limit < len(classes):
        raise DataError(f"data.limit={cfg.limit} is fewer than the {len(classes)} classes: every class needs a "
                        f"training image; use data.limit>={len(classes)} or null")
    train_idx, val_idx = stratified_split(labels, cfg.val_size, seed)
    train_idx = stratified_subset(train_idx, labels, cfg.limit, seed)
    counts = np.bincount(np.asarray(labels)[train_idx], minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:  # a small class can lose every image to the validation split or to data.limit
        raise DataError(f"class(es) {', '.join(empty[:5])} have no training images after the validation split"
                        f"{' and data.limit' if cfg.limit is not None else ''}; lower data.val_size, raise "
                        "data.limit, or add images")
    if cfg.mean is not None and cfg.std is not None:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    else:  # measure on up to 2,000 training images (deterministic sample)
        pick = np.sort(np.random.default_rng(seed).permutation(train_idx)[:2000])
        sample = train_load.take(pick)
        bad = getattr(train_load, "bad", None)
        if bad:
            sample = sample[torch.as_tensor([int(i) not in bad for i in pick], dtype=torch.bool)]
        mean, std = channel_stats(sample)
        mean, std = tuple(cfg.mean or mean), tuple(cfg.std or std)
    return DataSplits(train=ImageDataset(train_load, labels, train_idx),
                      val=ImageDataset(train_load, labels, val_idx),
                      test=test, classes=classes, mean=mean, std=std)


class SeededOrder(Sampler):
    """(index, augmentation seed) pairs for torchvision's DataLoader: each pass draws a permutation (or keeps
    the order) and one seed per sample from `generator` in the main process. The images a batch gets then do
    not depend on the number of workers, and a pass can start at any sample (`skip`) for an exact resume."""

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator, batch_size: int = 1,
                 shard: tuple = (0, 1)) -> None:
        self.n, self.shuffle, self.generator, self.batch_size, self.shard = n, shuffle, generator, batch_size, shard
        self.skip = 0  # samples the next pass leaves out (then reset)

    def __len__(self) -> int:
        world = self.shard[1]
        return self.n if world == 1 else self.n // (self.batch_size * world) * self.batch_size

    def __iter__(self) -> Iterator:
        g = self.generator
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        order, seeds = (shard_order(t, self.batch_size, *self.shard) for t in (order, seeds))
        start, self.skip = self.skip, 0
        return iter(zip(order[start:].tolist(), seeds[start:].tolist(), strict=True))


def shard_order(order: torch.Tensor, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """This rank's part of an epoch order: slice `rank` of every global batch of batch_size x world (whole
    global batches only), so N ranks see exactly the batches one process would at batch_size x N."""
    if world == 1:
        return order
    n = len(order) // (batch_size * world) * batch_size * world
    return order[:n].view(-1, world, batch_size)[:, rank].reshape(-1)


def skip_none_collate(batch: list):
    """default_collate without the unreadable images ImageFiles gives as None under data.bad_images=skip."""
    kept = [b for b in batch if b is not None]
    if not kept:
        raise DataError("every image of a batch was unreadable (data.bad_images=skip); check the data folder")
    return default_collate(kept)


def _worker_ignores_signals(_worker_id: int) -> None:
    """Loader workers ignore SIGINT (a Ctrl-C reaches the whole process group) and drop the training
    process's SIGTERM handler they inherited: the main process alone decides when to stop, and its
    shutdown of the workers (terminate() = SIGTERM) must still end them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def make_loader(ds: ImageDataset, batch_size: int, train: bool, num_workers: int, seed: int,
                pin_memory: bool = False, drop_partial: bool = False, shard: tuple = (0, 1)) -> DataLoader:
    """A DataLoader. The training one draws its order and a per-image augmentation seed from its own seeded
    generator (SeededOrder): reproducible for any number of workers, and resumable at any batch."""
    sampler = SeededOrder(len(ds), True, torch.Generator().manual_seed(seed), batch_size, shard) if train else None
    # The DataLoader draws worker base seeds from its own generator, a different number of times with and
    # without (persistent) workers: keep it apart from SeededOrder's, whose draws alone decide the data.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed + 1), worker_init_fn=_worker_ignores_signals,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, collate_fn=skip_none_collate,
                      # BatchNorm cannot train on a batch of one; a compiled model recompiles for a partial one
                      drop_last=train and (drop_partial or len(ds) % batch_size == 1))
