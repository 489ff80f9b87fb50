"""cbam_train.augment.batched: each batched op against torchvision's per-image op, sampling, the pipeline."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cbam_train.augment.batched import (
    BatchAugment,
    adjust_hue,
    crop,
    hflip,
    normalize,
    rotate,
)
from cbam_train.augment.colour import adjust_brightness, adjust_contrast, adjust_saturation
from cbam_train.augment.per_image import build_eval_transform

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)  # fn_idx order


def images(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """b different random uint8 images (B, 3, H, W)."""
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def per_image(fn, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """The reference: fn applied image by image with that image's (Python scalar) parameters."""
    return torch.stack([fn(x[i], *(p[i].item() for p in params)) for i in range(len(x))])


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1]."""
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


# --- functional ops vs torchvision, each sample with its own parameters ---------------------------

@pytest.mark.parametrize("h,w", [(32, 32), (20, 28)])
def test_crop_matches_pad_then_crop_exactly(h, w):
    x, p = unit(images(8, h, w)), 4
    top = torch.tensor([0, 8, 3, 5, 1, 7, 2, 6])
    left = torch.tensor([8, 0, 6, 2, 4, 4, 7, 1])
    expected = torch.stack([TF.crop(TF.pad(x[i], [p]), int(top[i]), int(left[i]), h, w) for i in range(8)])
    assert torch.equal(crop(x, top, left, p), expected)
    # uint8 in, uint8 out, same pixels
    assert torch.equal(crop(images(8, h, w), top, left, p), (expected * 255).round().to(torch.uint8))
    # a smaller output size, as RandomCrop(size) of a larger image
    small = torch.stack([TF.crop(TF.pad(x[i], [p]), int(top[i]), int(left[i]), 16, 16) for i in range(8)])
    assert torch.equal(crop(x, top, left, p, size=16), small)


def test_hflip_flips_only_masked_images_exactly():
    x = unit(images(6))
    mask = torch.tensor([True, False, False, True, True, False])
    expected = torch.stack([TF.horizontal_flip(img) if m else img for img, m in zip(x, mask, strict=True)])
    assert torch.equal(hflip(x, mask), expected)
    assert not torch.equal(expected, x)


JITTER_CASES = [
    (adjust_brightness, TF.adjust_brightness, [0.0, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 0.9]),
    (adjust_contrast, TF.adjust_contrast, [0.0, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 0.9]),
    (adjust_saturation, TF.adjust_saturation, [0.0, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 0.9]),
    (adjust_hue, TF.adjust_hue, [-0.5, -0.3, -0.1, 0.0, 0.05, 0.1, 0.3, 0.5]),
]


@pytest.mark.parametrize("ours,theirs,values", JITTER_CASES, ids=["brightness", "contrast", "saturation", "hue"])
def test_colour_op_matches_torchvision_on_float_images(ours, theirs, values):
    x = unit(images(8, seed=1))
    x[0, :, :4] = 0.5  # gray pixels (hue undefined) and pure colours (hue at the sextant borders)
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[2, :, :4] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)
    f = torch.tensor(values)[torch.randperm(8, generator=torch.Generator().manual_seed(2))]
    before = x.clone()
    out = ours(x, f)
    assert torch.equal(x, before)  # not modified in place
    assert out.dtype == torch.float32 and out.shape == x.shape
    # the brief allows 2/255; float32 agrees far closer than that
    assert (out - per_image(theirs, x, f)).abs().max() <= 1e-5


@pytest.mark.parametrize("ours,theirs,values", JITTER_CASES, ids=["brightness", "contrast", "saturation", "hue"])
def test_colour_op_within_two_levels_of_torchvision_on_uint8(ours, theirs, values):
    # torchvision on uint8 (the DataLoader path) truncates to integers after the op; we stay in float
    x8 = images(8, seed=3)
    f = torch.tensor(values)
    assert (ours(unit(x8), f) - unit(per_image(theirs, x8, f))).abs().max() <= 2 / 255


@pytest.mark.parametrize("h,w", [(32, 32), (31, 31), (24, 40)])
def test_rotate_matches_torchvision_nearest_fill_zero(h, w):
    x = unit(images(7, h, w, seed=4))
    angles = torch.tensor([-15.0, 15.0, 7.3, -3.1, 0.0, 11.9, 45.0])
    out = rotate(x, angles)
    ref = per_image(lambda img, a: TF.rotate(img, a, interpolation=InterpolationMode.NEAREST, fill=0), x, angles)
    for i in range(len(x)):  # the same grid math as torchvision: pixel for pixel
        assert torch.equal(out[i], ref[i]), f"angle {angles[i]}"
    assert torch.equal(out[4], x[4])  # angle 0 is exactly the identity
    assert (out[1] == 0).all(dim=0).any()  # the corners are filled with 0


# --- normalisation -------------------------------------------------------------------------------

def test_normalize_matches_torchvision_eval_transform_exactly():
    x8 = images(4)
    t = build_eval_transform(MEAN, STD)
    expected = torch.stack([t(img) for img in x8])
    assert torch.equal(normalize(x8, MEAN, STD), expected)
    assert torch.equal(normalize(x8, MEAN, STD), expected)
    xf = unit(x8)
    before = xf.clone()
    torch.testing.assert_close(normalize(xf, MEAN, STD), expected, atol=1e-6, rtol=0)
    assert torch.equal(xf, before)


# --- sampling ------------------------------------------------------------------------------------

def test_sampled_parameters_have_the_configured_distributions(make_cfg):
    aug = BatchAugment(make_cfg([]).augment, 32, MEAN, STD)
    n = 4096
    p = aug.sample(n, torch.Generator().manual_seed(0), "cpu")
    assert set(p) == {"crop_top", "crop_left", "flip", "jitter_order", "brightness", "contrast", "saturation",
                      "hue", "angle"}
    assert all(len(v) == n for v in p.values())
    for key, (lo, hi) in {"brightness": (0.8, 1.2), "contrast": (0.8, 1.2), "saturation": (0.8, 1.2),
                          "hue": (-0.1, 0.1), "angle": (-15.0, 15.0)}.items():
        v, span = p[key], hi - lo
        assert lo <= v.min() < lo + 0.01 * span and hi - 0.01 * span < v.max() <= hi, key
        assert abs(v.mean() - (lo + hi) / 2) < 0.03 * span, key
    assert abs(p["flip"].float().mean() - 0.5) < 0.04
    for key in ("crop_top", "crop_left"):
        counts = torch.bincount(p[key], minlength=9)
        assert len(counts) == 9 and counts.min() > n / 9 * 0.7, key  # offsets 0..2p, roughly uniform
    order = p["jitter_order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # each row a permutation
    # every op lands in every position about equally often (n / 16 each)
    position_counts = torch.stack([torch.bincount(order[:, r], minlength=4) for r in range(4)])
    assert position_counts.min() > n / 16 * 0.7
    # independent across parameters and across neighbouring samples
    pairs = [(p["brightness"], p["contrast"]), (p["saturation"], p["angle"]), (p["hue"], p["brightness"]),
             (p["crop_top"].float(), p["crop_left"].float()), (p["flip"].float(), p["angle"]),
             (order[:, 0].float(), p["brightness"]), (p["angle"][:-1], p["angle"][1:]),
             (p["brightness"][:-1], p["brightness"][1:]), (order[:-1, 0].float(), order[1:, 0].float())]
    for a, b in pairs:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.1


def test_disabled_ops_draw_nothing(make_cfg):
    g = torch.Generator().manual_seed(0)
    assert BatchAugment(make_cfg(["augment=none"]).augment, 32, MEAN, STD).sample(8, g, "cpu") == {}
    flipcrop = BatchAugment(make_cfg(["augment=flipcrop"]).augment, 32, MEAN, STD).sample(8, g, "cpu")
    assert set(flipcrop) == {"crop_top", "crop_left", "flip"}
    # a jitter op of strength 0 is skipped, as ColorJitter does
    cfg = make_cfg(["augment.color_jitter.hue=0", "augment.color_jitter.brightness=0"]).augment
    assert set(BatchAugment(cfg, 32, MEAN, STD).sample(8, g, "cpu")) == {
        "crop_top", "crop_left", "flip", "jitter_order", "contrast", "saturation", "angle"}


# --- the pipeline --------------------------------------------------------------------------------

def reference(x8: torch.Tensor, p: dict, padding: int, orders: torch.Tensor) -> torch.Tensor:
    """torchvision image by image: pad+crop, flip, the jitter ops in the given order, rotate, normalise."""
    out = []
    for i, img in enumerate(unit(x8)):
        img = TF.crop(TF.pad(img, [padding]), int(p["crop_top"][i]), int(p["crop_left"][i]), 32, 32)
        if p["flip"][i]:
            img = TF.horizontal_flip(img)
        for k in orders[i].tolist():
            key = ("brightness", "contrast", "saturation", "hue")[k]
            img = TV_JITTER[k](img, p[key][i].item())
        img = TF.rotate(img, p["angle"][i].item(), interpolation=InterpolationMode.NEAREST, fill=0)
        out.append(TF.normalize(img, list(MEAN), list(STD)))
    return torch.stack(out)


def test_pipeline_matches_torchvision_per_image_with_each_samples_order(make_cfg):
    cfg = make_cfg(["augment.color_jitter.hue=0.5", "augment.color_jitter.saturation=0.9",
                    "augment.color_jitter.brightness=0.6"]).augment  # strong jitter: the order shows
    aug = BatchAugment(cfg, 32, MEAN, STD)
    x8 = images(24, seed=5)
    p = aug.sample(24, torch.Generator().manual_seed(1), "cpu")
    out = aug.apply(x8, p)
    err = (denormalise(out) - denormalise(reference(x8, p, 4, p["jitter_order"]))).abs()
    assert err.max() <= 1e-5  # float rounding only
    # the test can see a wrong order: each sample's reversed order gives other images
    wrong = (denormalise(out) - denormalise(reference(x8, p, 4, p["jitter_order"].flip(1)))).abs()
    assert (wrong.flatten(1).amax(dim=1) > 0.05).float().mean() > 0.5


def test_same_seed_same_output_other_seed_other_output(make_cfg):
    aug = BatchAugment(make_cfg([]).augment, 32, MEAN, STD)
    x8 = images(16)
    a = aug(x8, torch.Generator().manual_seed(0))
    assert torch.equal(a, aug(x8, torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, aug(x8, torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(0)
    first, second = aug(x8, g), aug(x8, g)
    assert torch.equal(first, a) and not torch.allclose(first, second)  # the generator's state advances
    # each sample is augmented differently: identical inputs give different outputs
    same = images(1).expand(16, -1, -1, -1)
    out = aug(same, g)
    assert not torch.allclose(out[0], out[1]) and len({o.sum().item() for o in out}) == 16


def test_seed_recipe_uint8_in_float32_out_input_untouched(make_cfg):
    aug = BatchAugment(make_cfg([]).augment, 32, MEAN, STD)
    x8 = images(32)
    before = x8.clone()
    out = aug(x8, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == x8.shape
    assert torch.equal(x8, before)
    assert torch.isfinite(out).all()
    x = denormalise(out)
    assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5
    assert not torch.allclose(out, normalize(x8, MEAN, STD), atol=1e-3)


def test_none_is_exactly_normalize(make_cfg):
    aug = BatchAugment(make_cfg(["augment=none"]).augment, 32, MEAN, STD)
    x8 = images(8)
    assert torch.equal(aug(x8, torch.Generator().manual_seed(0)), normalize(x8, MEAN, STD))


def test_flip_only_with_p1_flips_every_image(make_cfg):
    cfg = make_cfg(["augment=none", "augment.flip.enabled=true", "augment.flip.p=1.0"]).augment
    x8 = images(8)
    out = BatchAugment(cfg, 32, MEAN, STD)(x8, torch.Generator().manual_seed(0))
    assert torch.equal(out, normalize(x8.flip(-1), MEAN, STD))


def test_wrong_image_size_or_generator_device_is_an_actionable_error(make_cfg):
    aug = BatchAugment(make_cfg([]).augment, 32, MEAN, STD)
    with pytest.raises(ValueError, match="data.image_size"):
        aug(images(2, 16, 16), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="generator"):
        aug(images(2).to("meta"), torch.Generator().manual_seed(0))  # a CPU generator for a non-CPU batch


def test_flipcrop_recipe_is_exactly_torchvision_crop_and_flip(make_cfg):
    aug = BatchAugment(make_cfg(["augment=flipcrop"]).augment, 32, MEAN, STD)
    x8 = images(16, seed=6)
    p = aug.sample(16, torch.Generator().manual_seed(2), "cpu")
    expected = []
    for i, img in enumerate(x8):
        img = TF.crop(TF.pad(img, [4]), int(p["crop_top"][i]), int(p["crop_left"][i]), 32, 32)
        expected.append(TF.horizontal_flip(img) if p["flip"][i] else img)
    assert 0 < p["flip"].sum() < 16
    assert torch.equal(aug.apply(x8, p), normalize(torch.stack(expected), MEAN, STD))


def test_a_single_jitter_op_applies_to_every_sample(make_cfg):
    cfg = make_cfg(["augment=none", "augment.color_jitter.enabled=true", "augment.color_jitter.brightness=0.5",
                    "augment.color_jitter.contrast=0", "augment.color_jitter.saturation=0",
                    "augment.color_jitter.hue=0"]).augment
    aug = BatchAugment(cfg, 32, MEAN, STD)
    x8 = images(8)
    p = aug.sample(8, torch.Generator().manual_seed(0), "cpu")
    assert set(p) == {"jitter_order", "brightness"}
    expected = normalize(per_image(TF.adjust_brightness, unit(x8), p["brightness"]), MEAN, STD)
    torch.testing.assert_close(aug.apply(x8, p), expected, atol=1e-5, rtol=0)


def test_sync_free_jitter_path_matches_the_sorted_path(make_cfg):
    """On accelerators the jitter rounds use masks (no host sync); they must give the sorted path's images."""
    cfg = make_cfg([]).augment
    aug = BatchAugment(cfg, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    params = aug.sample(64, torch.Generator().manual_seed(4), x.device)
    sorted_path = aug.apply(x, params, sync_free=False)
    masked_path = aug.apply(x, params, sync_free=True)
    assert torch.allclose(sorted_path, masked_path, atol=1e-5)
    assert not torch.allclose(masked_path, aug.apply(x, aug.sample(64, torch.Generator().manual_seed(5), x.device),
                                                     sync_free=True), atol=1e-3)
