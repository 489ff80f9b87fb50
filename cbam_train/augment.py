"""Per-image augmentation pipelines (torchvision transforms v2 on uint8 tensors)."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

from cbam_train.config import AugmentConfig


def build_train_transform(cfg: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The recipe's order: crop, flip, colour jitter, rotation, then float [0, 1] and normalise."""
    ops = []
    if cfg.crop.enabled:
        ops.append(v2.RandomCrop(image_size, padding=cfg.crop.padding))
    if cfg.flip.enabled:
        ops.append(v2.RandomHorizontalFlip(cfg.flip.p))
    cj = cfg.color_jitter
    if cj.enabled:
        ops.append(v2.ColorJitter(cj.brightness, cj.contrast, cj.saturation, cj.hue))
    if cfg.rotation.enabled and cfg.rotation.degrees > 0:
        ops.append(v2.RandomRotation(cfg.rotation.degrees))  # nearest, fill 0: the recipe's defaults
    return v2.Compose(ops + _to_normalised(mean, std))


def build_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(_to_normalised(mean, std))


def _to_normalised(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
