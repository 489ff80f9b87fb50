"""Batches for training and evaluation: the in-memory loader (one uint8 tensor on the training
device, index permutations, batched augmentation) or torchvision's DataLoader (per-image transforms
in worker processes) for data that does not fit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from cbam_train.augment.batched import BatchAugment, normalize
from cbam_train.augment.mixing import BatchMix
from cbam_train.augment.per_image import build_eval_transform, build_train_transform
from cbam_train.config.errors import DataError
from cbam_train.config.schema import AugmentConfig, DataConfig
from cbam_train.data.datasets import DataSplits, ImageDataset, SeededOrder, make_loader, shard_order


@dataclass(frozen=True)
class Batching:
    """How a MemoryLoader cuts its images into batches."""

    batch_size: int
    shuffle: bool
    drop_partial: bool = False  # leave out the last, smaller batch
    chunk: int = 0  # images transformed at a time, rounded down to whole batches (at least one)


class MemoryLoader:
    """Yields (float normalised (B, 3, H, W), int64 (B,)) batches from uint8 images on the device.

    No per-image Python and no worker processes: the transform runs on `chunk` images at a time (a
    whole number of batches; one gather and a few dozen kernels for thousands of images, so small
    batches do not pay per-kernel launch costs), and batches are slices of the result. The shuffle
    order and every augmentation draw come from `generator` (on the images' device). Setting `skip` makes the
    next pass start at that batch, drawing exactly what a full pass draws (an exact mid-epoch resume).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batching: Batching,
                 transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                 generator: torch.Generator, shard: tuple = (0, 1),
                 augment_generator: Optional[torch.Generator] = None) -> None:
        batch_size = batching.batch_size
        self.images, self.labels, self.drop_partial = images, labels, batching.drop_partial
        self.chunk = max(1, batching.chunk // batch_size) * batch_size  # at least one batch
        self.batch_size, self.shuffle = batch_size, batching.shuffle
        self.transform, self.generator = transform, generator
        # data-parallel: this rank's (rank, world); every rank draws the same order from `generator` and
        # takes its slice of each global batch of batch_size x world; augmentation draws from its own generator
        self.shard, self.augment_generator = shard, augment_generator or generator
        self.skip = 0  # batches the next pass leaves out (then reset)

    def _n(self) -> int:
        rank, world = self.shard
        if world > 1:  # whole global batches only, so every rank takes the same number of steps
            return len(self.labels) // (self.batch_size * world) * self.batch_size
        n, rest = len(self.labels), len(self.labels) % self.batch_size
        # training drops a last batch of one (BatchNorm cannot train on a single sample), or any partial
        # one when asked (a compiled model would recompile for the odd shape), as make_loader does
        return n - rest if self.shuffle and (rest == 1 or self.drop_partial) else n

    def __len__(self) -> int:
        return math.ceil(self._n() / self.batch_size)

    def __iter__(self) -> Iterator:
        n = len(self.labels)
        order = (torch.randperm(n, generator=self.generator, device=self.images.device) if self.shuffle
                 else torch.arange(n, device=self.images.device))
        end, first = self._n(), self.skip * self.batch_size
        self.skip = 0
        order = shard_order(order, self.batch_size, *self.shard)
        for c in range(0, end, self.chunk):
            idx = order[c:min(c + self.chunk, end)]
            x, y = self.transform(self.images[idx], self.augment_generator), self.labels[idx]  # drawn even if skipped
            for i in range(max(0, first - c), len(idx), self.batch_size):
                yield x[i:i + self.batch_size], y[i:i + self.batch_size]


@dataclass
class Loaders:
    train: MemoryLoader | DataLoader
    val: MemoryLoader | DataLoader
    test: Optional[MemoryLoader | DataLoader]
    kind: str  # memory | torchvision
    augment: Optional[BatchAugment]  # the batched transform (memory loader only)
    generators: tuple = ()  # every random draw of the training data (order, augmentation, mixing)
    mix: Optional[BatchMix] = None  # augment.mix, applied by the training loop to each batch on the device

    def close(self) -> None:
        """Stop the persistent worker processes of torchvision loaders now, not at interpreter exit (where
        multiprocessing's atexit terminates them and torch reports each as 'killed by signal')."""
        for loader in (self.train, self.val, self.test):
            shutdown_workers(loader)

    def skip_train_batches(self, k: int) -> None:
        """Make the next training pass start at batch k (for resuming mid-epoch)."""
        if isinstance(self.train, MemoryLoader):
            self.train.skip = k
        else:
            order = self.train.sampler
            assert isinstance(order, SeededOrder)  # make_loader orders every training DataLoader with one
            order.skip = k * order.batch_size  # the loader's batch size: make_loader gives both the same


def shutdown_workers(loader: Any) -> None:
    """End a DataLoader's persistent workers (a no-op for the memory loader or a loader without workers)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()  # DataLoader's own clean shutdown (its __del__ calls the same)
        loader._iterator = None


def choose_loader(splits: DataSplits, loader: str, budget_mb: int) -> str:
    """memory when asked, or (auto) when the decoded splits fit the budget; else torchvision."""
    if loader != "auto":
        return loader
    total = sum(ds.nbytes() for ds in (splits.train, splits.val, splits.test) if ds is not None)
    return "memory" if total <= budget_mb * 2**20 else "torchvision"


def build_eval_loader(ds: ImageDataset, cfg: DataConfig, kind: str, device: torch.device, mean: tuple, std: tuple,
                      workers: int):
    """An unshuffled, unaugmented, normalised loader over one split, of the given kind."""
    if kind == "memory":
        images, labels = ds.materialize()

        def eval_tf(x: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
            return normalize(x, mean, std)

        return MemoryLoader(images.to(device), labels.to(device), Batching(cfg.eval_batch_size, False,
                            chunk=cfg.augment_chunk), eval_tf, torch.Generator(device=device))
    ds.transform = build_eval_transform(mean, std)
    return make_loader(ds, cfg.eval_batch_size, False, workers, 0, device.type == "cuda")


def build_loaders(splits: DataSplits, cfg: DataConfig, augment_cfg: AugmentConfig, device: torch.device, seed: int,
                  workers: int, drop_partial: bool = False, shard: tuple = (0, 1)) -> Loaders:
    """Train / val / test loaders of the configured kind, seeded; the train one augments (and drops a
    partial last batch with drop_partial). With shard=(rank, world) the train loader yields this rank's
    part of each global batch; every rank evaluates the whole val and test splits."""
    world = shard[1]
    if cfg.batch_size * world > len(splits.train):
        per = f" ({world} processes x {cfg.batch_size})" if world > 1 else ""
        raise DataError(f"data.batch_size={cfg.batch_size}{per} is larger than the {len(splits.train)} training "
                        f"images (after the validation split); lower data.batch_size")
    kind = choose_loader(splits, cfg.loader, cfg.memory_budget_mb)
    mean, std = splits.mean, splits.std
    mixer = None
    if BatchMix.enabled(augment_cfg.mix):  # its own CPU generator: a few draws per batch, no device round trip
        mix_gen = torch.Generator().manual_seed(seed + 2_000_029 + 1_000_003 * shard[0])
        mixer = BatchMix(augment_cfg.mix, len(splits.classes), cfg.image_size, mix_gen)
    extra = (mixer.generator,) if mixer is not None else ()
    val = build_eval_loader(splits.val, cfg, kind, device, mean, std, workers)
    test = build_eval_loader(splits.test, cfg, kind, device, mean, std, workers) if splits.test is not None else None
    if kind == "memory":
        gen = torch.Generator(device=device).manual_seed(seed)
        rank, world = shard
        aug_gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * rank) if world > 1 else gen
        aug = BatchAugment(augment_cfg, cfg.image_size, mean, std)
        images, labels = splits.train.materialize()
        train = MemoryLoader(images.to(device), labels.to(device),
                             Batching(cfg.batch_size, True, drop_partial, cfg.augment_chunk), aug, gen, shard, aug_gen)
        return Loaders(train, val, test, kind, aug, ((gen,) if aug_gen is gen else (gen, aug_gen)) + extra, mixer)
    splits.train.transform = build_train_transform(augment_cfg, cfg.image_size, mean, std)
    loader = make_loader(splits.train, cfg.batch_size, True, workers, seed, device.type == "cuda", drop_partial, shard)
    order = loader.sampler
    assert isinstance(order, SeededOrder)  # make_loader orders every training DataLoader with one
    return Loaders(loader, val, test, kind, None, (order.generator,) + extra, mixer)
