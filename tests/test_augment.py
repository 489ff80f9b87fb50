"""cbam_train.augment.per_image: the training recipe (crop, flip, colour jitter, rotation) and evaluation
normalisation."""

from __future__ import annotations

import pytest
import torch

from cbam_train.augment.per_image import build_eval_transform, build_train_transform

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def normalise(img: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """The reference: uint8 (3, H, W) -> float32 (img / 255 - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (img.float() / 255 - m) / s


def denormalise(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Back to the uint8 scale (rounded), to compare with pixel values."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return ((x * s + m) * 255).round()


@pytest.fixture
def img() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)


def only(make_cfg, *overrides: str):
    return make_cfg(["augment=none", *overrides]).augment


def test_seed_recipe_output_type_and_shape(make_cfg, img):
    aug = make_cfg([]).augment
    assert aug.name == "seed"
    t = build_train_transform(aug, 32, MEAN, STD)
    before = img.clone()
    torch.manual_seed(0)
    outs = [t(img) for _ in range(10)]
    assert torch.equal(img, before)  # the input is not modified in place
    plain = normalise(img)
    for out in outs:
        assert out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, plain, atol=1e-3)
    # values stay those of images in [0, 1], normalised
    lo = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1, 1)
    hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1, 1)
    for out in outs:
        assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()


def test_seed_recipe_at_another_image_size(make_cfg):
    small = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    t = build_train_transform(make_cfg([]).augment, 16, MEAN, STD)
    torch.manual_seed(0)
    assert tuple(t(small).shape) == (3, 16, 16)


def test_none_is_exact_normalisation(make_cfg, img):
    t = build_train_transform(make_cfg(["augment=none"]).augment, 32, MEAN, STD)
    for _ in range(3):
        out = t(img)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, normalise(img), atol=1e-6, rtol=0)


def test_flip_only_p1_flips_horizontally(make_cfg, img):
    t = build_train_transform(only(make_cfg, "augment.flip.enabled=true", "augment.flip.p=1.0"), 32, MEAN, STD)
    expected = normalise(img.flip(-1))  # columns reversed, rows kept
    for _ in range(5):
        torch.testing.assert_close(t(img), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(expected, normalise(img.flip(-2)))


def test_flip_p0_never_flips(make_cfg, img):
    t = build_train_transform(only(make_cfg, "augment.flip.enabled=true", "augment.flip.p=0.0"), 32, MEAN, STD)
    for _ in range(5):
        torch.testing.assert_close(t(img), normalise(img), atol=1e-6, rtol=0)


def test_flip_p_half_does_both(make_cfg, img):
    t = build_train_transform(only(make_cfg, "augment.flip.enabled=true", "augment.flip.p=0.5"), 32, MEAN, STD)
    torch.manual_seed(0)
    flipped = [torch.allclose(t(img), normalise(img.flip(-1)), atol=1e-6) for _ in range(40)]
    assert 5 < sum(flipped) < 35


def _crop_offsets(out: torch.Tensor, img: torch.Tensor, pad: int) -> list:
    """Offsets (dy, dx) at which `out` (normalised) is the 32x32 window of img zero-padded by `pad`."""
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad), value=0)
    size = img.shape[-1]
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            if torch.allclose(out, normalise(padded[:, dy:dy + size, dx:dx + size]), atol=1e-6, rtol=0):
                hits.append((dy, dx))
    return hits


def test_crop_only_is_a_window_of_the_zero_padded_image(make_cfg, img):
    aug = only(make_cfg, "augment.crop.enabled=true", "augment.crop.padding=4")
    t = build_train_transform(aug, 32, MEAN, STD)
    torch.manual_seed(0)
    offsets = []
    for _ in range(20):
        hits = _crop_offsets(t(img), img, 4)
        assert len(hits) == 1  # exactly one of the 81 windows (a random image has no repeats)
        offsets.append(hits[0])
    assert len(set(offsets)) > 5  # the offset is drawn, not fixed
    assert any(o != (4, 4) for o in offsets)


def test_crop_padding_zero_is_identity(make_cfg, img):
    t = build_train_transform(only(make_cfg, "augment.crop.enabled=true", "augment.crop.padding=0"), 32, MEAN, STD)
    torch.testing.assert_close(t(img), normalise(img), atol=1e-6, rtol=0)


def test_random_draws_reproducible_under_manual_seed(make_cfg, img):
    t = build_train_transform(make_cfg([]).augment, 32, MEAN, STD)
    torch.manual_seed(123)
    a1, a2 = t(img), t(img)
    torch.manual_seed(123)
    b1, b2 = t(img), t(img)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.allclose(a1, a2)  # successive draws differ
    torch.manual_seed(124)
    assert not torch.allclose(t(img), a1)


@pytest.mark.parametrize("op", [
    ["augment.color_jitter.enabled=true"],
    ["augment.rotation.enabled=true", "augment.rotation.degrees=15"],
])
def test_jitter_and_rotation_change_most_draws(make_cfg, img, op):
    t = build_train_transform(only(make_cfg, *op), 32, MEAN, STD)
    torch.manual_seed(0)
    plain = normalise(img)
    changed = sum(not torch.allclose(t(img), plain, atol=1e-4) for _ in range(20))
    assert changed >= 15


def test_rotation_is_nearest_with_zero_fill(make_cfg):
    # pixels in 100..200, so the fill value 0 cannot be confused with an image pixel
    img = torch.randint(100, 201, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    t = build_train_transform(only(make_cfg, "augment.rotation.enabled=true", "augment.rotation.degrees=15"),
                              32, MEAN, STD)
    torch.manual_seed(0)
    filled = 0
    for _ in range(20):
        px = denormalise(t(img))
        values = set(px.unique().tolist())
        assert values <= set(range(100, 201)) | {0.0}  # nearest: no interpolated values, no other fill
        filled += int((px == 0).all(0).sum() > 0)
    assert filled >= 10  # corners are filled with 0 unless the angle is within a few degrees of 0


def test_rotation_enabled_with_zero_degrees_is_identity(make_cfg, img):
    t = build_train_transform(only(make_cfg, "augment.rotation.enabled=true", "augment.rotation.degrees=0"),
                              32, MEAN, STD)
    torch.testing.assert_close(t(img), normalise(img), atol=1e-6, rtol=0)


def test_flipcrop_preset_has_no_colour_change(make_cfg, img):
    t = build_train_transform(make_cfg(["augment=flipcrop"]).augment, 32, MEAN, STD)
    torch.manual_seed(0)
    for _ in range(10):
        out = t(img)
        hits = _crop_offsets(out, img, 4) + _crop_offsets(out, img.flip(-1), 4)
        assert hits  # a (possibly flipped) window of the padded image, colours untouched


@pytest.mark.parametrize("mean,std", [(MEAN, STD), ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))])
def test_eval_transform_is_deterministic_normalisation(img, mean, std):
    t = build_eval_transform(mean, std)
    outs = [t(img) for _ in range(3)]
    for out in outs:
        assert out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)
        torch.testing.assert_close(out, normalise(img, mean, std), atol=1e-6, rtol=0)
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("preset, cls", [("trivial", "TrivialAugmentWide"), ("autoaugment", "AutoAugment")])
def test_policy_presets_put_torchvisions_policy_after_the_flip(make_cfg, preset, cls):
    tf = build_train_transform(make_cfg([f"augment={preset}", "data.root=/x"]).augment, 32, MEAN, STD)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", cls, "ToDtype", "Normalize"]
    if preset == "autoaugment":
        assert tf.transforms[2].policy.name == "CIFAR10"


def test_erasing_and_cutout_come_after_normalising(make_cfg, img):
    cfg = only(make_cfg, "augment.erase.enabled=true", "augment.erase.p=1.0", "augment.erase.value=0.5",
               "augment.cutout.enabled=true", "augment.cutout.size=6")
    tf = build_train_transform(cfg, 32, MEAN, STD)
    erasing = tf.transforms[-2]
    assert (type(erasing).__name__, erasing.p, erasing.scale, erasing.ratio, erasing.value) == (
        "RandomErasing", 1.0, (0.02, 0.33), (0.3, 3.3), [0.5])
    torch.manual_seed(0)
    assert (tf(img) == 0.5).all(dim=0).sum() > 0  # a rectangle of the value, in normalised units
    cut = build_train_transform(only(make_cfg, "augment.cutout.enabled=true", "augment.cutout.size=6"), 32, MEAN, STD)
    for seed in range(5):
        torch.manual_seed(seed)
        out = cut(img)
        zero = (out == 0).all(dim=0)
        rows, cols = zero.any(dim=1).nonzero()[:, 0], zero.any(dim=0).nonzero()[:, 0]
        assert zero.sum() == 36 and rows.max() - rows.min() == 5 and cols.max() - cols.min() == 5
        torch.testing.assert_close(out[:, ~zero], normalise(img)[:, ~zero], atol=1e-6, rtol=0)
