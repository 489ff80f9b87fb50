"""cbam_train.augment.ops: each policy op at fixed magnitudes, erasing and cutout against torchvision's own ops."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cbam_train.augment.batched import BatchAugment
from cbam_train.augment.ops import OPS, SIGNED, Policy, apply_ops, cutout_boxes, erase, erase_boxes, magnitudes
from cbam_train.config.schema import AugmentConfig

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
GEOMETRIC = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def unit_images(b: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """b random float images on the uint8 grid, (B, 3, size, size), with a few flat channels (autocontrast's edge)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g).float() / 255
    x[0, 1] = 0.5
    return x


def torchvision_op(img: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """torchvision's own op dispatch (_AutoAugmentBase._apply_image_or_video_transform): nearest, fill 0."""
    t = v2.TrivialAugmentWide()
    return t._apply_image_or_video_transform(img, op, magnitude, interpolation=v2.InterpolationMode.NEAREST,
                                             fill=t._fill)


@pytest.mark.parametrize("policy", ["trivial", "autoaugment"])
@pytest.mark.parametrize("op", OPS)
def test_each_op_at_its_magnitudes_matches_torchvision(policy, op):
    """Every bin of the op's magnitude table (signed both ways where it is signed), one per image in one batch:
    exact for the geometric ops, posterize, solarize, equalize, invert and autocontrast; 1e-5 for the blends."""
    if policy == "trivial" and op == "Invert":
        pytest.skip("TrivialAugmentWide has no Invert")
    bins = 31 if policy == "trivial" else 10
    mags = magnitudes(op, bins, 12, policy)
    mags = torch.cat([mags, -mags]) if op in SIGNED else mags
    x = unit_images(len(mags))
    expected = torch.stack([torchvision_op(x[i], op, float(mags[i])) for i in range(len(x))])
    for sync_free in (False, True):
        got = apply_ops(x, torch.full((len(x),), OPS.index(op)), mags, sync_free)
        if op in GEOMETRIC or op in ("Posterize", "Solarize", "Equalize", "Invert", "AutoContrast"):
            assert torch.equal(got, expected), (op, (got - expected).abs().max())
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_batch_of_mixed_ops_gives_each_image_its_own_op_on_both_paths():
    g = torch.Generator().manual_seed(3)
    x = unit_images(40)
    policy = Policy("autoaugment", 12)
    params = policy.sample(40, g, "cpu")
    expected = x.clone()
    for r in range(2):
        expected = torch.stack([torchvision_op(expected[i], OPS[int(params["policy_op"][i, r])],
                                               float(params["policy_mag"][i, r])) for i in range(40)])
    for sync_free in (False, True):
        torch.testing.assert_close(Policy.apply(x, params, sync_free), expected, atol=1e-5, rtol=0)


def test_policy_draws_have_torchvision_ranges():
    g = torch.Generator().manual_seed(0)
    trivial = Policy("trivial", 32).sample(4000, g, "cpu")
    op, mag = trivial["policy_op"][:, 0], trivial["policy_mag"][:, 0]
    counts = torch.bincount(op, minlength=14)
    assert len(counts) == 14 and counts.min() > 200  # uniform over the 14 ops (~286 each)
    assert (mag[op == OPS.index("Rotate")].abs() <= 135).all() and (mag[op == OPS.index("Rotate")] < 0).any()
    assert set(mag[op == OPS.index("Posterize")].tolist()) <= set(range(2, 9))
    assert (mag[op == OPS.index("Solarize")] >= 0).all()  # unsigned
    auto = Policy("autoaugment", 32).sample(4000, g, "cpu")
    # sub-policy 15 of 25 is (Solarize 0.5, Invert 0.0): Invert never applies there; skipped ops are Identity (0)
    assert (auto["policy_op"] == 0).float().mean().item() == pytest.approx(0.47, abs=0.05)
    assert (auto["policy_op"][:, 0] <= len(OPS) - 1).all()


@pytest.mark.parametrize("value", [0.0, -1.5])
def test_erase_matches_torchvision_erase_exactly(value):
    x = torch.randn(5, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0, 0, 3, 4], [2, 5, 8, 7], [9, 11, 1, 1], [4, 4, 0, 0], [0, 0, 10, 12]])
    expected = torch.stack([TF.erase(x[i], *boxes[i].tolist(), torch.tensor(value)) for i in range(5)])
    assert torch.equal(erase(x.clone(), boxes, value), expected)


def test_erase_boxes_follow_random_erasing_bounds():
    g = torch.Generator().manual_seed(0)
    boxes = erase_boxes(4000, 32, 32, (0.02, 0.33), (0.3, 3.3), 0.5, g, "cpu")
    top, left, h, w = boxes.unbind(1)
    erased = h > 0
    assert erased.float().mean().item() == pytest.approx(0.5, abs=0.03)
    area = (h * w)[erased].float() / 1024
    assert area.min() >= 0.01 and area.max() <= 0.37  # scale, widened by the rounding of h and w
    assert (h < 32).all() and (w < 32).all() and (top + h <= 32).all() and (left + w <= 32).all()
    ratio = (h.float() / w.float())[erased]
    assert ratio.min() >= 0.2 and ratio.max() <= 4.5 and (ratio < 1).any() and (ratio > 1).any()
    assert not erase_boxes(50, 32, 32, (0.02, 0.33), (0.3, 3.3), 0.0, g, "cpu")[:, 2].any()  # p = 0


def test_cutout_squares_lie_inside_the_image_as_airbench():
    g = torch.Generator().manual_seed(0)
    boxes = cutout_boxes(2000, 32, 32, 12, 1.0, g, "cpu")
    assert (boxes[:, 2:] == 12).all() and boxes[:, :2].min() == 0 and boxes[:, :2].max() == 20
    x = erase(torch.ones(2000, 3, 32, 32), boxes, 0.0)
    assert ((x == 0).sum(dim=(1, 2, 3)) == 3 * 144).all()


def test_batch_pipeline_with_trivial_and_erasing_is_per_image_torchvision():
    """BatchAugment with the policy and erasing on (crop and flip off): each image is torchvision's op with that
    image's sampled op and magnitude, normalised, then its own box erased."""
    cfg = AugmentConfig(policy="trivial")
    cfg.crop.enabled = cfg.flip.enabled = cfg.color_jitter.enabled = cfg.rotation.enabled = False
    cfg.erase.enabled, cfg.erase.p, cfg.erase.value = True, 0.7, 0.25
    aug = BatchAugment(cfg, 12, MEAN, STD)
    x = (unit_images(30) * 255).round().to(torch.uint8)
    params = aug.sample(30, torch.Generator().manual_seed(5), "cpu")
    norm = v2.Normalize(list(MEAN), list(STD))
    expected = []
    for i in range(30):
        img = norm(torchvision_op(x[i].float() / 255, OPS[int(params["policy_op"][i, 0])],
                                  float(params["policy_mag"][i, 0])))
        expected.append(TF.erase(img, *params["erase_box"][i].tolist(), torch.tensor(0.25)))
    for sync_free in (False, True):
        torch.testing.assert_close(aug.apply(x, params, sync_free=sync_free), torch.stack(expected),
                                   atol=5e-5, rtol=0)


def test_policy_and_erasing_draw_from_the_generator_only():
    cfg = AugmentConfig(policy="autoaugment")
    cfg.erase.enabled = cfg.cutout.enabled = True
    cfg.cutout.size = 4
    aug = BatchAugment(cfg, 12, MEAN, STD)
    x = (unit_images(16) * 255).to(torch.uint8)
    a, b = (aug(x, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, aug(x, torch.Generator().manual_seed(8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host-sync check needs a CUDA device")
def test_cuda_path_does_no_host_sync():
    """The policies, erasing, cutout and mixing on CUDA: after a first call (which copies the policy's tables
    to the device once), a chunk augments and mixes with no host sync."""
    from cbam_train.augment.mixing import BatchMix
    from cbam_train.config.schema import MixConfig

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    mixer = BatchMix(MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0), 10, 32, torch.Generator().manual_seed(0))
    for policy in ("trivial", "autoaugment"):
        cfg = AugmentConfig(policy=policy)
        cfg.erase.enabled = cfg.cutout.enabled = True
        aug = BatchAugment(cfg, 32, MEAN, STD)
        g = torch.Generator(device="cuda").manual_seed(0)
        aug(x, g)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                mixer(aug(x, g), y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
