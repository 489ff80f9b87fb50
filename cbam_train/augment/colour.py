"""The colour primitives both batched augmentations share (augment/batched.py's ColorJitter, augment/ops.py's
policies): grayscale, brightness, contrast and saturation per image of a float [0, 1] batch (B, 3, H, W), each
image with its own factor, as torchvision's adjust_* functions compute them."""

from __future__ import annotations

from torch import Tensor

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601 luma)


def each(v: Tensor) -> Tensor:
    """A per-sample vector (B,) as (B, 1, 1, 1), to broadcast over (B, C, H, W)."""
    return v.view(-1, 1, 1, 1)


def gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY[0]).add_(g, alpha=GRAY[1]).add_(b, alpha=GRAY[2]).unsqueeze(1)  # (B, 1, H, W)


def brightness_(x: Tensor, f: Tensor) -> Tensor:
    return x.mul_(each(f)).clamp_(0.0, 1.0)


def contrast_(x: Tensor, f: Tensor) -> Tensor:
    # The mean of the grayscale image is the luma-weighted sum of the channel means (it is linear),
    # which needs one reduction instead of a grayscale image and its mean.
    m = x.mean(dim=(-2, -1))  # (B, 3); Python-float weights: no host-to-device copy (a sync on CUDA)
    mean = m[:, 0] * GRAY[0] + m[:, 1] * GRAY[1] + m[:, 2] * GRAY[2]  # (B,)
    return x.mul_(each(f)).add_(each(mean * (1.0 - f))).clamp_(0.0, 1.0)


def saturation_(x: Tensor, f: Tensor) -> Tensor:
    grey = gray(x).mul_(each(1.0 - f))
    return x.mul_(each(f)).add_(grey).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    """Scale each image by its factor f (B,), clamped to [0, 1] (torchvision's adjust_brightness)."""
    return brightness_(x.clone(), f)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """Blend each image with the mean of its grayscale image: f * x + (1 - f) * mean, clamped."""
    return contrast_(x.clone(), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """Blend each image with its grayscale image: f * x + (1 - f) * gray, clamped."""
    return saturation_(x.clone(), f)
