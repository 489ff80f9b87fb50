"""MixUp and CutMix on a batch already on the training device, for both loaders (augment.mix).

timm's Mixup in batch mode (prob, switch_prob; one weight per batch), with torchvision v2's pairing: image i
is mixed with image i - 1 (the batch rolled by 1), its box and its corrected weight as v2.CutMix. Every
parameter is a few numbers per batch, drawn on the host from a seeded CPU torch.Generator that checkpoints
save; the images and labels stay on the device, so the CUDA path does no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cbam_train.config.schema import MixConfig


@dataclass
class MixParams:
    """One batch's draw: lam, the weight of each image's own label; box (y1, y2, x1, x2) for CutMix, else None."""

    lam: float = 1.0
    box: Optional[tuple] = None


def beta(alpha: float, g: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from g: torch.distributions.Beta's own sampler (a 2-way Dirichlet)."""
    return float(torch._sample_dirichlet(torch.tensor([alpha, alpha], dtype=torch.float), generator=g)[0])


def cutmix_box(lam: float, h: int, w: int, r_y: int, r_x: int) -> tuple:
    """v2.CutMix's box about centre (r_y, r_x) for weight lam, clipped to the image; (y1, y2, x1, x2)."""
    r = 0.5 * math.sqrt(1.0 - lam)
    r_w_half, r_h_half = int(r * w), int(r * h)
    return max(r_y - r_h_half, 0), min(r_y + r_h_half, h), max(r_x - r_w_half, 0), min(r_x + r_w_half, w)


def mix(x: Tensor, y: Tensor, params: MixParams, num_classes: int) -> tuple[Tensor, Tensor, float]:
    """(mixed images, soft targets (B, num_classes), the own label's weight): v2.MixUp's or v2.CutMix's arithmetic."""
    label = F.one_hot(y, num_classes).to(x.dtype)
    lam = params.lam
    if params.box is not None:
        y1, y2, x1, x2 = params.box
        out = x.clone()
        out[..., y1:y2, x1:x2] = x.roll(1, 0)[..., y1:y2, x1:x2]
        lam = 1.0 - (x2 - x1) * (y2 - y1) / (x.shape[-1] * x.shape[-2])  # the area actually pasted
    elif lam != 1.0:
        out = x.roll(1, 0).mul_(1.0 - lam).add_(x.mul(lam))
    else:
        out = x
    return out, label.roll(1, 0).mul_(1.0 - lam).add_(label.mul(lam)), lam


class BatchMix:
    """augment.mix for one training process: draws per batch from its own CPU generator, applies on the device."""

    def __init__(self, cfg: MixConfig, num_classes: int, image_size: int, generator: torch.Generator) -> None:
        self.cfg, self.num_classes, self.size, self.generator = cfg, num_classes, image_size, generator

    @staticmethod
    def enabled(cfg: MixConfig) -> bool:
        return cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)

    def sample(self) -> MixParams:
        """One batch's parameters. Every call draws the same number of values, whatever it decides, so that
        skipping k batches (a resume mid-epoch) is k calls."""
        c, g, h, w = self.cfg, self.generator, self.size, self.size
        u_apply, u_switch = torch.rand(2, generator=g).tolist()  # a CPU generator: no device involved
        r_y = int(torch.randint(h, (1,), generator=g))
        r_x = int(torch.randint(w, (1,), generator=g))
        use_cutmix = c.cutmix_alpha > 0 and (c.mixup_alpha <= 0 or u_switch < c.switch_prob)
        lam = beta(c.cutmix_alpha if use_cutmix else c.mixup_alpha, g)
        if u_apply >= c.prob:
            return MixParams()
        return MixParams(lam, cutmix_box(lam, h, w, r_y, r_x) if use_cutmix else None)

    def skip(self, batches: int) -> None:
        """Draw and drop what `batches` batches would have drawn."""
        for _ in range(batches):
            self.sample()

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mixed x, soft targets, each image's dominant label: its own where lam >= 0.5, else its partner's)."""
        mixed, target, own = mix(x, y, self.sample(), self.num_classes)
        return mixed, target, y if own >= 0.5 else y.roll(1, 0)
