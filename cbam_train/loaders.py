"""Batches for training and evaluation: the in-memory loader (one uint8 tensor on the training
device, index permutations, batched augmentation) or torchvision's DataLoader (per-image transforms
in worker processes) for data that does not fit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from cbam_train.augment import build_eval_transform, build_train_transform
from cbam_train.augment_batched import BatchAugment, normalize
from cbam_train.config import AugmentConfig, DataConfig
from cbam_train.data import DataSplits, ImageDataset, make_loader


class MemoryLoader:
    """Yields (float normalised (B, 3, H, W), int64 (B,)) batches from uint8 images on the device.

    No per-image Python and no worker processes: the transform runs on `chunk` images at a time (a
    whole number of batches; one gather and a few dozen kernels for thousands of images, so small
    batches do not pay per-kernel launch costs), and batches are slices of the result. The shuffle
    order and every augmentation draw come from `generator` (on the images' device).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                 generator: torch.Generator, drop_partial: bool = False, chunk: int = 0) -> None:
        self.images, self.labels, self.drop_partial = images, labels, drop_partial
        self.chunk = max(1, chunk // batch_size) * batch_size  # at least one batch
        self.batch_size, self.shuffle, self.transform, self.generator = batch_size, shuffle, transform, generator

    def _n(self) -> int:
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
        end = self._n()
        for c in range(0, end, self.chunk):
            idx = order[c:min(c + self.chunk, end)]
            x, y = self.transform(self.images[idx], self.generator), self.labels[idx]
            for i in range(0, len(idx), self.batch_size):
                yield x[i:i + self.batch_size], y[i:i + self.batch_size]


@dataclass
class Loaders:
    train: object
    val: object
    test: Optional[object]
    kind: str  # memory | torchvision
    augment: Optional[BatchAugment]  # the batched transform (memory loader only)


def choose_loader(splits: DataSplits, loader: str, budget_mb: int) -> str:
    """memory when asked, or (auto) when the decoded splits fit the budget; else torchvision."""
    if loader != "auto":
        return loader
    total = sum(ds.nbytes() for ds in (splits.train, splits.val, splits.test) if ds is not None)
    return "memory" if total <= budget_mb * 2**20 else "torchvision"


def build_loaders(splits: DataSplits, cfg: DataConfig, augment_cfg: AugmentConfig, device: torch.device, seed: int,
                  workers: int, drop_partial: bool = False) -> Loaders:
    """Train / val / test loaders of the configured kind, seeded; the train one augments (and drops a
    partial last batch with drop_partial)."""
    kind = choose_loader(splits, cfg.loader, cfg.memory_budget_mb)
    if kind == "memory":
        gen = torch.Generator(device=device).manual_seed(seed)
        aug = BatchAugment(augment_cfg, cfg.image_size, splits.mean, splits.std)
        mean, std = splits.mean, splits.std

        def eval_tf(x: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
            return normalize(x, mean, std)

        def memory(ds: ImageDataset, batch: int, train: bool) -> MemoryLoader:
            images, labels = ds.materialize()
            return MemoryLoader(images.to(device), labels.to(device), batch, train, aug if train else eval_tf, gen,
                                drop_partial, cfg.augment_chunk)

        test = memory(splits.test, cfg.eval_batch_size, False) if splits.test is not None else None
        return Loaders(memory(splits.train, cfg.batch_size, True), memory(splits.val, cfg.eval_batch_size, False),
                       test, kind, aug)
    splits.train.transform = build_train_transform(augment_cfg, cfg.image_size, splits.mean, splits.std)
    per_image_eval = build_eval_transform(splits.mean, splits.std)
    splits.val.transform = per_image_eval
    pin = device.type == "cuda"
    test = None
    if splits.test is not None:
        splits.test.transform = per_image_eval
        test = make_loader(splits.test, cfg.eval_batch_size, False, workers, seed, pin)
    return Loaders(make_loader(splits.train, cfg.batch_size, True, workers, seed, pin, drop_partial),
                   make_loader(splits.val, cfg.eval_batch_size, False, workers, seed, pin), test, kind, None)
