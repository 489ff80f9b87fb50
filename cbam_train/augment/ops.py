"""Batched random erasing, cutout, TrivialAugmentWide and AutoAugment (CIFAR-10 policy), for augment_batched.

Same semantics as torchvision v2's RandomErasing, TrivialAugmentWide() and AutoAugment(CIFAR10) (nearest, fill 0),
with each image's own op and magnitude drawn from the seeded generator on the data's device, and no host sync on
accelerators: ops run as sorted slices on CPU (one sync per chunk, as the jitter rounds) and as masks elsewhere.
The policies work on float [0, 1] images (torchvision's on uint8 round after every op); erasing on normalised ones.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import equalize

from cbam_train.augment.colour import adjust_brightness, adjust_contrast, adjust_saturation, each
from cbam_train.config.schema import AugmentConfig

# op ids: TrivialAugmentWide draws one of the first 14, AutoAugment's policy also uses Invert
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
_GEOMETRIC = 5  # ops 1..5 are one affine warp each
ERASE_ATTEMPTS = 10  # boxes RandomErasing.get_params tries per image before it leaves the image alone
# torchvision's AutoAugmentPolicy.CIFAR10: 25 sub-policies of 2 (op, probability, magnitude bin of 10)
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)))


def magnitudes(op: str, bins: int, size: int, policy: str) -> Tensor:
    """The magnitude of each bin, as torchvision's _AUGMENTATION_SPACE (trivial: 31 bins; autoaugment: 10)."""
    wide = policy == "trivial"
    if op in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.99 if wide else 0.3, bins)
    if op in ("TranslateX", "TranslateY"):
        return torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * size, bins)
    if op == "Rotate":
        return torch.linspace(0.0, 135.0 if wide else 30.0, bins)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.99 if wide else 0.9, bins)
    if op == "Posterize":
        return (8 - (torch.arange(bins) / ((bins - 1) / (6 if wide else 4)))).round().int().float()
    if op == "Solarize":
        return torch.linspace(1.0, 0.0, bins)
    return torch.zeros(bins)


def affine_theta(shear_x: Tensor, shear_y: Tensor, tx: Tensor, ty: Tensor, angle: Tensor, w: int, h: int,
                 top_left: Tensor) -> Tensor:
    """(B, 2, 3) float32: torchvision's _get_inverse_affine_matrix per image, in float64 as its Python floats.

    shear_*: degrees; tx, ty: pixels; angle: degrees counter-clockwise (rotate's -angle); top_left: bool (B,),
    the centre at pixel (0, 0) (the policies' shears) rather than the image centre."""
    rot = torch.deg2rad(angle.double().remainder(360.0))
    sx, sy = torch.deg2rad(shear_x.double()), torch.deg2rad(shear_y.double())
    cx = torch.where(top_left, -0.5 * w, 0.0).double()
    cy = torch.where(top_left, -0.5 * h, 0.0).double()
    cos_sy, tan_sx = sy.cos(), sx.tan()
    a = (rot - sy).cos() / cos_sy
    b = -(a * tan_sx + rot.sin())
    c = (rot - sy).sin() / cos_sy
    d = rot.cos() - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    cxt, cyt = cx + tx.double(), cy + ty.double()
    m2 = cx - m0 * cxt - m1 * cyt
    m5 = cy - m3 * cxt - m4 * cyt
    return torch.stack((m0, m1, m2, m3, m4, m5), dim=1).view(-1, 2, 3).float()


def warp(x: Tensor, theta: Tensor) -> Tensor:
    """grid_sample x (B, C, H, W) at torchvision's _affine_grid of each image's inverse matrix; nearest, fill 0."""
    h, w = x.shape[-2:]
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
    base = torch.stack((xs.expand(h, w), ys.view(h, 1).expand(h, w), torch.ones(h, w, device=x.device)), dim=-1)
    scaled = theta.to(x.dtype).transpose(1, 2).contiguous()  # (B, 3, 2)
    scaled[..., 0] /= 0.5 * w
    scaled[..., 1] /= 0.5 * h
    grid = base.view(1, h * w, 3).expand(len(x), -1, -1).bmm(scaled).view(-1, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _geometric(x: Tensor, op: Tensor, m: Tensor) -> Tensor:
    # ops 1..5 with signed magnitude m: shear (tan of the angle, about the top-left), translate (whole pixels)
    # and rotate (degrees), as torchvision's _apply_image_or_video_transform; one warp for all five
    zero = torch.zeros_like(m)
    shear = torch.rad2deg(torch.atan(m.double()))  # degrees(atan(magnitude)), in float64 as torchvision's
    trans = torch.trunc(m)  # int(magnitude)
    theta = affine_theta(torch.where(op == 1, shear, zero), torch.where(op == 2, shear, zero),
                         torch.where(op == 3, trans, zero), torch.where(op == 4, trans, zero),
                         torch.where(op == 5, -m, zero), x.shape[-1], x.shape[-2], (op == 1) | (op == 2))
    return warp(x, theta)


def _sharpness(x: Tensor, f: Tensor) -> Tensor:
    # torchvision's adjust_sharpness: the interior blended with a 3x3 smoothing (1s, 5 in the middle, / 13)
    kernel = torch.full((3, 3), 1.0 / 13.0, dtype=x.dtype, device=x.device)  # Python floats: no host-to-device copy
    kernel[1, 1] = 5.0 / 13.0
    out = x.clone()
    blurred = F.conv2d(out, kernel.expand(x.shape[1], 1, 3, 3), groups=x.shape[1])
    view = out[..., 1:-1, 1:-1]
    view.addcmul_(blurred.sub_(view), each(1.0 - f))
    return out.clamp_(0.0, 1.0)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    levels = each(torch.exp2(bits))
    return x.mul(levels).floor_().clamp_(min=torch.zeros_like(levels), max=levels - 1).div_(levels)


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x >= each(threshold), 1.0 - x, x)


def _autocontrast(x: Tensor, _m: Tensor) -> Tensor:
    low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, high - low)
    return (x - torch.where(flat, 0.0, low)).div_(scale).clamp_(0.0, 1.0)


# op id -> fn(x, signed magnitude) for the colour ops (Identity and the warps are handled apart)
_COLOUR: dict[int, Callable[[Tensor, Tensor], Tensor]] = {
    6: lambda x, m: adjust_brightness(x, 1.0 + m), 7: lambda x, m: adjust_saturation(x, 1.0 + m),
    8: lambda x, m: adjust_contrast(x, 1.0 + m), 9: lambda x, m: _sharpness(x, 1.0 + m), 10: _posterize, 11: _solarize,
    12: _autocontrast, 13: lambda x, m: equalize(x), 14: lambda x, m: 1.0 - x}


def apply_op(x: Tensor, op: Tensor, m: Tensor) -> Tensor:
    """Image i gets op OPS[op[i]] at signed magnitude m[i], every op on the whole batch, kept by masks (no sync)."""
    if op.device.type == "cpu" and op.numel() and int(op.min()) == int(op.max()):  # one op for all: no masks
        k = int(op[0])
        return x if k == 0 else _geometric(x, op, m) if k <= _GEOMETRIC else _COLOUR[k](x, m)
    out = torch.where(each((op >= 1) & (op <= _GEOMETRIC)), _geometric(x, op, m), x)
    for k, fn in _COLOUR.items():
        out = torch.where(each(op == k), fn(x, m), out)
    return out


def apply_ops(x: Tensor, op: Tensor, m: Tensor, sync_free: bool) -> Tensor:
    """apply_op; off sync_free (CPU), sorted by op so that each op runs once on its own slice (one host sync)."""
    if sync_free:
        return apply_op(x, op, m)
    order = op.argsort(stable=True)
    counts = torch.bincount(op, minlength=len(OPS)).tolist()
    xs, ops, ms = x.index_select(0, order), op[order], m[order]
    start = 0
    for n in counts:
        if n:
            xs[start:start + n] = apply_op(xs[start:start + n], ops[start:start + n], ms[start:start + n])
        start += n
    return torch.empty_like(xs).index_copy_(0, order, xs)


class Policy:
    """TrivialAugmentWide or AutoAugment's CIFAR-10 policy: per-image draws (sample) and their ops (apply)."""

    def __init__(self, name: str, image_size: int) -> None:
        self.name = name
        ops = OPS[:14] if name == "trivial" else OPS  # TrivialAugmentWide has no Invert
        bins = 31 if name == "trivial" else 10
        self.tables = {"magnitude": torch.stack([magnitudes(o, bins, image_size, name) for o in ops]),  # (ops, bins)
                       "signed": torch.tensor([o in SIGNED for o in ops])}
        if name == "autoaugment":  # (25, 2) per sub-policy
            self.tables.update(op=torch.tensor([[OPS.index(o) for o, _, _ in sub] for sub in CIFAR10_POLICY]),
                               p=torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY]),
                               bin=torch.tensor([[b or 0 for _, _, b in sub] for sub in CIFAR10_POLICY]))
        self._on: dict[str, dict[str, Tensor]] = {}

    def _tables(self, device: torch.device | str) -> dict[str, Tensor]:
        # copied to a device once: a host-to-device copy per chunk would be a sync on CUDA
        if str(device) not in self._on:
            self._on[str(device)] = {k: v.to(device) for k, v in self.tables.items()}
        return self._on[str(device)]

    def sample(self, n: int, g: torch.Generator, device: torch.device | str) -> dict[str, Tensor]:
        """policy_op, policy_mag: (B, rounds) op ids and signed magnitudes (rounds: 1 trivial, 2 autoaugment)."""
        t = self._tables(device)
        table = t["magnitude"]
        if self.name == "trivial":  # torchvision's draws: the op, its bin, the sign
            op = torch.randint(0, len(table), (n, 1), generator=g, device=device)
            mag = table[op, torch.randint(0, table.shape[1], (n, 1), generator=g, device=device)]
        else:  # the sub-policy, then whether each of its 2 ops applies (an op skipped is Identity)
            sub = torch.randint(0, len(CIFAR10_POLICY), (n,), generator=g, device=device)
            applied = torch.rand(n, 2, generator=g, device=device) <= t["p"][sub]
            op = torch.where(applied, t["op"][sub], 0)
            mag = table[op, t["bin"][sub]]
        flip = (torch.rand(n, op.shape[1], generator=g, device=device) <= 0.5) & t["signed"][op]
        return {"policy_op": op, "policy_mag": torch.where(flip, -mag, mag)}

    @staticmethod
    def apply(x: Tensor, params: dict[str, Tensor], sync_free: bool) -> Tensor:
        """Each round's op per image on float [0, 1] x (B, 3, H, W)."""
        for r in range(params["policy_op"].shape[1]):
            x = apply_ops(x, params["policy_op"][:, r], params["policy_mag"][:, r], sync_free)
        return x


def erase_boxes(n: int, h: int, w: int, scale: tuple, ratio: tuple, p: float, g: torch.Generator,
                device: torch.device | str) -> Tensor:
    """(B, 4) int64 top, left, height, width per image, as RandomErasing.get_params (height 0: not erased).

    Up to ERASE_ATTEMPTS per image, all drawn at once; the first whose box fits wins (torchvision's loop)."""
    attempts = ERASE_ATTEMPTS
    area = torch.rand(n, attempts, generator=g, device=device).mul_(scale[1] - scale[0]).add_(scale[0]) * (h * w)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.rand(n, attempts, generator=g, device=device).mul_(hi - lo).add_(lo).exp_()
    eh, ew = (area * aspect).sqrt_().round_().long(), (area / aspect).sqrt_().round_().long()
    fits = (eh < h) & (ew < w)
    first = torch.where(fits.any(dim=1), fits.long().argmax(dim=1), 0)
    eh, ew = eh.gather(1, first[:, None])[:, 0], ew.gather(1, first[:, None])[:, 0]
    u = torch.rand(n, 2, generator=g, device=device)
    erased = (torch.rand(n, generator=g, device=device) < p) & fits.any(dim=1)
    top = (u[:, 0] * (h - eh + 1)).long().clamp_(max=h - 1)  # uniform in [0, h - eh], torch.randint's range
    left = (u[:, 1] * (w - ew + 1)).long().clamp_(max=w - 1)
    return torch.stack((top, left, torch.where(erased, eh, 0), torch.where(erased, ew, 0)), dim=1)


def cutout_boxes(n: int, h: int, w: int, size: int, p: float, g: torch.Generator,
                 device: torch.device | str) -> Tensor:
    """(B, 4) boxes of size x size wholly inside the image, as airbench's make_random_square_masks."""
    top = torch.randint(0, h - size + 1, (n,), generator=g, device=device)
    left = torch.randint(0, w - size + 1, (n,), generator=g, device=device)
    side = torch.where(torch.rand(n, generator=g, device=device) < p, size, 0)
    return torch.stack((top, left, side, side), dim=1)


def erase(x: Tensor, boxes: Tensor, value: float) -> Tensor:
    """Fill box (top, left, height, width) of each image with value, in place; a mask, no data-dependent shape."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device).view(1, h, 1) - boxes[:, 0].view(-1, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - boxes[:, 1].view(-1, 1, 1)
    inside = (rows >= 0) & (rows < boxes[:, 2].view(-1, 1, 1)) & (cols >= 0) & (cols < boxes[:, 3].view(-1, 1, 1))
    return x.masked_fill_(inside.unsqueeze(1), value)


class Erasing:
    """augment.erase and augment.cutout, drawn per image and applied to the normalised batch."""

    def __init__(self, cfg: AugmentConfig, image_size: int) -> None:
        self.size = image_size
        self.erase: Optional[tuple[tuple, tuple, float, float]] = None  # scale, ratio, p, fill value
        if cfg.erase.enabled and cfg.erase.p > 0:
            e = cfg.erase
            self.erase = (tuple(e.scale), tuple(e.ratio), e.p, e.value)
        self.cutout = (cfg.cutout.size, cfg.cutout.p) if cfg.cutout.enabled and cfg.cutout.p > 0 else None

    def __bool__(self) -> bool:
        return self.erase is not None or self.cutout is not None

    def sample(self, n: int, g: torch.Generator, device: torch.device | str) -> dict[str, Tensor]:
        s, params = self.size, {}
        if self.erase is not None:
            params["erase_box"] = erase_boxes(n, s, s, *self.erase[:3], g, device)
        if self.cutout is not None:
            params["cutout_box"] = cutout_boxes(n, s, s, *self.cutout, g, device)
        return params

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        if "erase_box" in params:
            assert self.erase is not None  # sample() draws erase boxes only when erasing is on
            erase(x, params["erase_box"], self.erase[3])
        if "cutout_box" in params:
            erase(x, params["cutout_box"], 0.0)
        return x
