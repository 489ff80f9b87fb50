"""Per-image augmentation pipelines (torchvision transforms v2 on uint8 tensors)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cbam_train.config.schema import AugmentConfig


class Cutout(v2.Transform):
    """airbench's cutout for one image: with probability p, a size x size square wholly inside it set to 0."""

    def __init__(self, size: int, p: float = 1.0) -> None:
        super().__init__()
        self.size, self.p = size, p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, ()))
        left = int(torch.randint(0, w - self.size + 1, ()))
        return F.erase(image, top, left, self.size, self.size, torch.zeros((), dtype=image.dtype))

    def extra_repr(self) -> str:
        return f"size={self.size}, p={self.p}"


def build_train_transform(cfg: AugmentConfig, image_size: int, mean: Sequence[float],
                          std: Sequence[float]) -> v2.Compose:
    """The recipe's order: crop, flip, the policy (TrivialAugmentWide / AutoAugment CIFAR-10), colour jitter,
    rotation, float [0, 1] and normalise, then random erasing and cutout (on the normalised image)."""
    ops: list[Any] = []
    if cfg.crop.enabled:
        ops.append(v2.RandomCrop(image_size, padding=cfg.crop.padding))
    if cfg.flip.enabled:
        ops.append(v2.RandomHorizontalFlip(cfg.flip.p))
    if cfg.policy == "trivial":
        ops.append(v2.TrivialAugmentWide())  # nearest, fill 0
    elif cfg.policy == "autoaugment":
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    cj = cfg.color_jitter
    if cj.enabled:
        ops.append(v2.ColorJitter(cj.brightness, cj.contrast, cj.saturation, cj.hue))
    if cfg.rotation.enabled and cfg.rotation.degrees > 0:
        ops.append(v2.RandomRotation(cfg.rotation.degrees))  # nearest, fill 0: the recipe's defaults
    after: list[Any] = []
    e = cfg.erase
    if e.enabled and e.p > 0:
        after.append(v2.RandomErasing(e.p, tuple(e.scale), tuple(e.ratio), e.value))
    if cfg.cutout.enabled and cfg.cutout.p > 0:
        after.append(Cutout(cfg.cutout.size, cfg.cutout.p))
    return v2.Compose(ops + _to_normalised(mean, std) + after)


def build_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(_to_normalised(mean, std))


def _to_normalised(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
