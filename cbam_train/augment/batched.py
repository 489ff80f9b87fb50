"""Batched per-sample augmentation on the data's device: augment.py's recipe for a whole uint8 batch.

Each image gets its own random parameters, drawn from an explicit torch.Generator on the data's
device, with no per-image Python loop. Same ops, order and parameter ranges as torchvision v2's
RandomCrop(padding, fill 0), RandomHorizontalFlip, ColorJitter (random op order per image) and
RandomRotation (nearest, fill 0); then (augment_ops.py) TrivialAugmentWide or AutoAugment after the flip and
RandomErasing / cutout after normalising, as augment.py. Works in float32 [0, 1]; torchvision on uint8 rounds
after every op.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cbam_train.augment.colour import (
    brightness_,
    contrast_,
    each,
    saturation_,
)
from cbam_train.augment.ops import Erasing, Policy
from cbam_train.config.schema import AugmentConfig

# ColorJitter's fn_idx numbering: jitter_order[i, r] is the op sample i gets in round r
_JITTER = ("brightness", "contrast", "saturation", "hue")
_HUE_CENTRES = (3.0, 5.0, 1.0)  # hues (in sextants) where R, G, B are at their minimum (see adjust_hue)


def _crop_flip(x: Tensor, top: Tensor, left: Tensor, padding: int, out: tuple[int, int],
               flip: Optional[Tensor]) -> Tensor:
    # One gather from the zero-padded batch: output pixel (i, j) of sample b reads padded pixel
    # (top[b] + i, left[b] + j), or (top[b] + i, left[b] + ow - 1 - j) where flip[b].
    b, c, h, w = x.shape
    oh, ow = out
    padded = F.pad(x, (padding,) * 4) if padding else x
    rows = top.view(-1, 1) + torch.arange(oh, device=x.device)  # (B, oh)
    j = torch.arange(ow, device=x.device)
    cols = left.view(-1, 1) + (j if flip is None else torch.where(flip.view(-1, 1), ow - 1 - j, j))  # (B, ow)
    index = (rows.unsqueeze(2) * (w + 2 * padding) + cols.unsqueeze(1)).view(b, 1, oh * ow)
    return padded.reshape(b, c, -1).gather(2, index.expand(b, c, -1)).view(b, c, oh, ow)


def crop(x: Tensor, top: Tensor, left: Tensor, padding: int, size: Optional[int] = None) -> Tensor:
    """Per-sample crop of size x size (default: H x W) at (top, left) of x zero-padded by `padding` per side.

    top, left: (B,) integer offsets into the padded image, in [0, H + 2 * padding - size]; not checked.
    """
    return _crop_flip(x, top, left, padding, (x.shape[-2], x.shape[-1]) if size is None else (size, size), None)


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the images where the bool (B,) mask is set."""
    return torch.where(each(mask), x.flip(-1), x)


def adjust_hue(x: Tensor, shift: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Rotate each image's hue by shift (B,) turns in [-0.5, 0.5]; HSV saturation and value kept.

    out may be x itself (the result is written only once every read of x is done).
    """
    # torchvision's _rgb_to_hsv, shift, _hsv_to_rgb in closed form, with fewer passes over memory:
    # hue6 in sextants [0, 6) as _rgb_to_hsv (red wins ties, then green; ties give the same hue anyway)
    r, g, b = x.split(1, dim=1)  # (B, 1, H, W) views
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    chroma = maxc - chroma
    # num = where(max is r, g - b, where(max is g, b - r + 2 chroma, r - g + 4 chroma)) as blends with
    # 0/1 masks: torch.where is ~5x slower per element than arithmetic on CPU
    is_g, is_r = torch.ge(g, maxc).to(x.dtype), torch.ge(r, maxc).to(x.dtype)
    num = torch.add(r - g, chroma, alpha=4.0)
    num.addcmul_(is_g, torch.add(b - r, chroma, alpha=2.0).sub_(num))
    num.addcmul_(is_r, (g - b).sub_(num))
    # gray pixels (chroma 0) have num 0 and keep v whatever their hue; the clamp only avoids 0 / 0
    hue6 = num.div_(chroma.clamp_min(1e-12)).add_(each(6.0 * shift)).remainder_(6.0)
    # _hsv_to_rgb: channel n = v - chroma * w_n, w_n = clamp(2 - d_n, 0, 1), d_n the distance on the hue
    # circle (length 6) from hue6 to c_n (3, 5, 1 for R, G, B); with a = |hue6 - c_n|, 2 - d_n = |a - 3| - 1
    weight = torch.cat([hue6 - c for c in _HUE_CENTRES], dim=1).abs_().sub_(3.0).abs_()  # Python floats: no sync
    weight = weight.sub_(1.0).clamp_(0.0, 1.0)
    # v - chroma * weight >= v - chroma = min >= 0 and <= v <= 1 (chroma <= v): no clamp needed
    return torch.addcmul(maxc, chroma, weight, value=-1.0, out=out)


def _hue_(x: Tensor, shift: Tensor) -> Tensor:
    return adjust_hue(x, shift, out=x)


_JITTER_OPS_ = (brightness_, contrast_, saturation_, _hue_)


def _rotation_grid(degrees: Tensor, h: int, w: int) -> Tensor:
    # torchvision's rotate: the inverse affine matrix of -angle about the centre, i.e. output pixel
    # (x, y) (pixel units from the centre, y down) samples the input at [[cos, -sin], [sin, cos]] @ (x, y).
    # cos/sin in float64 and then float32, as torchvision computes them with math in Python floats.
    rad = torch.deg2rad(degrees.double().remainder(360.0))
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    theta = torch.stack((cos, -sin, zero, sin, cos, zero), dim=1).view(-1, 2, 3).float()
    # torchvision's _affine_grid: pixel-centre base grid times theta, normalised to [-1, 1] after
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=degrees.device)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=degrees.device)
    base = torch.stack((xs.expand(h, w), ys.view(h, 1).expand(h, w), torch.ones(h, w, device=xs.device)), dim=-1)
    scaled = theta.transpose(1, 2).contiguous()  # (B, 3, 2); scaled by Python floats: no host-to-device copy
    scaled[..., 0] /= 0.5 * w
    scaled[..., 1] /= 0.5 * h
    return base.view(1, h * w, 3).expand(len(degrees), -1, -1).bmm(scaled).view(-1, h, w, 2)


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image counter-clockwise by degrees (B,) about its centre; nearest, fill 0."""
    grid = _rotation_grid(degrees, *x.shape[-2:])
    # fill 0 by zero padding: torchvision's fill mask is exactly 0/1 under nearest sampling
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _unit_float(x: Tensor) -> Tensor:
    # A new tensor of torch's default dtype (float32 unless a caller changed it; the DDP equivalence test
    # trains in float64) in [0, 1]; uint8 scaled as torchvision's ToDtype(float32, scale=True)
    dtype = torch.get_default_dtype()
    if x.is_floating_point():
        return x.to(dtype, copy=True)
    return x.to(dtype).mul_(1.0 / 255)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (scaled to [0, 1]) or float [0, 1] (B, 3, H, W) -> float32 (the default dtype) (x - mean) / std."""
    return _normalize_(_unit_float(x), mean, std)


def _normalize_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    # per-channel in-place ops with Python floats: a tensor built from a list would be a blocking
    # host-to-device copy on every batch on CUDA
    for c in range(x.shape[1]):
        x[:, c].sub_(float(mean[c])).div_(float(std[c]))
    return x


class BatchAugment:
    """The training recipe of augment.build_train_transform, for a whole batch on its own device."""

    def __init__(self, cfg: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = image_size
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        # a disabled op or one that cannot change anything draws no parameters and costs nothing
        self.padding = cfg.crop.padding if cfg.crop.enabled else 0
        self.flip_p = cfg.flip.p if cfg.flip.enabled else 0.0
        self.degrees = cfg.rotation.degrees if cfg.rotation.enabled else 0.0
        cj = cfg.color_jitter
        # (low, high) per jitter op, as ColorJitter's _check_input; it skips ops of strength 0 too
        self.jitter: dict[str, tuple[float, float]] = {}
        if cj.enabled:
            for key in _JITTER[:3]:
                v = getattr(cj, key)
                if v > 0:
                    self.jitter[key] = (max(0.0, 1.0 - v), 1.0 + v)
            if cj.hue > 0:
                self.jitter["hue"] = (-cj.hue, cj.hue)
        self.policy = Policy(cfg.policy, image_size) if cfg.policy != "none" else None
        self.erasing = Erasing(cfg, image_size)

    def sample(self, batch: int, generator: torch.Generator, device: torch.device | str) -> dict[str, Tensor]:
        """Draw every enabled op's per-sample parameters, shape (B,) (jitter_order: (B, 4))."""
        g, n = generator, batch
        params: dict[str, Tensor] = {}
        if self.padding > 0:
            span = 2 * self.padding + 1  # offsets 0..2p into the padded image
            params["crop_top"] = torch.randint(0, span, (n,), generator=g, device=device)
            params["crop_left"] = torch.randint(0, span, (n,), generator=g, device=device)
        if self.flip_p > 0:
            params["flip"] = torch.rand(n, generator=g, device=device) < self.flip_p  # RandomHorizontalFlip
        if self.jitter:
            # a uniform random permutation of the 4 ops per sample (torch.randperm(4) per call in torchvision)
            params["jitter_order"] = torch.rand(n, 4, generator=g, device=device).argsort(dim=1)
            for key, (lo, hi) in self.jitter.items():
                params[key] = torch.rand(n, generator=g, device=device).mul_(hi - lo).add_(lo)
        if self.degrees > 0:
            d = self.degrees
            params["angle"] = torch.rand(n, generator=g, device=device).mul_(2 * d).sub_(d)
        if self.policy is not None:
            params.update(self.policy.sample(n, g, device))
        return {**params, **self.erasing.sample(n, g, device)}

    def apply(self, x: Tensor, params: dict[str, Tensor], sync_free: Optional[bool] = None) -> Tensor:
        """Augment uint8 (B, 3, H, W) with the ops params holds; returns float32, normalised. x is not modified.

        sync_free (default: on accelerators): colour-jitter rounds by masks, with no host sync, at the
        cost of computing every op on the whole batch; off (default on CPU): sorted slices, one op per sample.
        """
        sync_free = x.device.type != "cpu" if sync_free is None else sync_free
        several = sum(key in params for key in _JITTER) > 1
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"BatchAugment expects a (B, 3, {self.image_size}, {self.image_size}) batch "
                             f"(data.image_size), got {tuple(x.shape)}")
        rows = None  # rows[j]: the input sample that row j of the working batch holds; None: the identity
        if several and not sync_free:
            # the jitter rounds want the batch sorted by each sample's first op: sort now, on uint8
            rows = params["jitter_order"][:, 0].argsort(stable=True)
            x = x.index_select(0, rows)
            params = {key: v.index_select(0, rows) for key, v in params.items()}
        flip = params.get("flip")
        # crop and flip move whole pixels: done on uint8 (a quarter of the bytes), fused in one gather
        if "crop_top" in params:
            x = _crop_flip(x, params["crop_top"], params["crop_left"], self.padding, (self.image_size,) * 2, flip)
        elif flip is not None:
            x = hflip(x, flip)
        x = _unit_float(x)
        if self.policy is not None:
            x = self.policy.apply(x, params, sync_free)
        if several and sync_free:
            x = self._jitter_masked(x, params)
        elif rows is not None:
            x, spare, moved = self._jitter_rounds(x, params)
            rows = rows[moved]
            params = {key: v.index_select(0, moved) for key, v in params.items()}
        elif "jitter_order" in params:  # a single jitter op: the order does not matter
            k = next(k for k, key in enumerate(_JITTER) if key in params)
            _JITTER_OPS_[k](x, params[_JITTER[k]])
        if "angle" in params:
            x = rotate(x, params["angle"])
        x = self.erasing.apply(_normalize_(x, self.mean, self.std), params)
        if rows is not None:
            x = spare.index_copy_(0, rows, x)  # back to the input's sample order
        return x

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """apply(x, sample(...)) with parameters drawn on x's device from generator (on that device too)."""
        if generator.device.type != x.device.type:
            raise ValueError(f"the generator is on {generator.device} but the batch on {x.device}; "
                             "create it with torch.Generator(device=batch.device)")
        return self.apply(x, self.sample(x.shape[0], generator, x.device))

    @staticmethod
    def _jitter_masked(x: Tensor, params: dict[str, Tensor]) -> Tensor:
        # The same 4 rounds without reading anything back to the host: every enabled op runs on the whole
        # batch and a mask keeps each sample's own op. More arithmetic, but a GPU never waits for the CPU.
        order = params["jitter_order"]
        for r in range(4):
            out = x
            for k, key in enumerate(_JITTER):
                if key in params:
                    y = _JITTER_OPS_[k](x.clone(), params[key])
                    out = torch.where((order[:, r] == k).view(-1, 1, 1, 1), y, out)
            x = out
        return x

    @staticmethod
    def _jitter_rounds(x: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        # 4 rounds; in round r sample i gets op jitter_order[i, r]. Each round sorts the batch by that op
        # so every op runs in place on one contiguous slice: ~one op per sample per round, no masks.
        # x comes sorted by the first round's op. Returns x, a spare buffer of its shape, and moved:
        # row j of x now holds what was row moved[j].
        order = params["jitter_order"]
        counts = F.one_hot(order, 4).sum(dim=0).tolist()  # [round][op]: one host sync per batch, not 16
        moved = torch.arange(len(x), device=x.device)
        spare = torch.empty_like(x)  # the batch moves between two buffers: no new 6 MB per round
        for r in range(4):
            if r > 0:
                perm = order[moved, r].argsort(stable=True)
                moved = moved[perm]
                x, spare = torch.index_select(x, 0, perm, out=spare), x
            start = 0
            for k, key in enumerate(_JITTER):
                stop = start + counts[r][k]
                if key in params and stop > start:
                    _JITTER_OPS_[k](x[start:stop], params[key][moved[start:stop]])
                start = stop
        return x, spare, moved
