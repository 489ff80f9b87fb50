"""cbam_train.augment.mixing: MixUp / CutMix against torchvision v2's, the draws, and the soft-target loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from cbam_train.augment.mixing import BatchMix, MixParams, beta, cutmix_box, mix
from cbam_train.config.schema import MixConfig
from cbam_train.training.device import Amp
from cbam_train.training.engine import forward_loss


def batch(b: int = 8, size: int = 10, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, 5, (b,), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_is_torchvision_v2_mixup_for_its_weight(seed):
    x, y = batch()
    torch.manual_seed(seed)
    x_tv, y_tv = v2.MixUp(alpha=0.8, num_classes=5)(x, y)
    torch.manual_seed(seed)  # v2.MixUp's one draw: lam from Beta(alpha, alpha)
    lam = float(torch.distributions.Beta(torch.tensor([0.8]), torch.tensor([0.8])).sample(()))
    x_ours, y_ours, own = mix(x, y, MixParams(lam), 5)
    assert torch.equal(x_ours, x_tv) and torch.equal(y_ours, y_tv) and own == lam


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_is_torchvision_v2_cutmix_for_its_weight_and_centre(seed):
    x, y = batch(size=12)
    torch.manual_seed(seed)
    x_tv, y_tv = v2.CutMix(alpha=1.0, num_classes=5)(x, y)
    torch.manual_seed(seed)  # v2.CutMix's draws: lam, then the box centre's x and y
    lam = float(torch.distributions.Beta(torch.tensor([1.0]), torch.tensor([1.0])).sample(()))
    r_x, r_y = int(torch.randint(12, size=(1,))), int(torch.randint(12, size=(1,)))
    x_ours, y_ours, own = mix(x, y, MixParams(lam, cutmix_box(lam, 12, 12, r_y, r_x)), 5)
    assert torch.equal(x_ours, x_tv) and torch.equal(y_ours, y_tv)
    kept = (x_ours == x).all(dim=1).float().mean(dim=(1, 2))  # each image's pixels outside the pasted box
    assert torch.allclose(kept, torch.tensor(own))


def test_beta_is_torch_distributions_beta_on_the_same_generator_state():
    torch.manual_seed(11)
    expected = float(torch.distributions.Beta(torch.tensor([0.4]), torch.tensor([0.4])).sample(()))
    assert beta(0.4, torch.Generator().manual_seed(11)) == expected


def test_draws_per_batch_are_fixed_so_skipping_replays_a_pass():
    cfg = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.5)
    full = BatchMix(cfg, 5, 12, torch.Generator().manual_seed(3))
    draws = [full.sample() for _ in range(200)]
    resumed = BatchMix(cfg, 5, 12, torch.Generator().manual_seed(3))
    resumed.skip(7)
    assert [resumed.sample() for _ in range(5)] == draws[7:12]
    unmixed = sum(d.lam == 1.0 and d.box is None for d in draws) / len(draws)
    cut = sum(d.box is not None for d in draws) / len(draws)
    assert unmixed == pytest.approx(0.4, abs=0.1) and cut == pytest.approx(0.3, abs=0.1)


@pytest.mark.parametrize("cfg, kind", [(MixConfig(mixup_alpha=1.0), "mixup"), (MixConfig(cutmix_alpha=1.0), "cutmix"),
                                       (MixConfig(mixup_alpha=1.0, prob=0.0), "none")])
def test_only_the_configured_kind_is_drawn(cfg, kind):
    mixer = BatchMix(cfg, 5, 12, torch.Generator().manual_seed(0))
    draws = [mixer.sample() for _ in range(50)]
    assert all((d.box is not None) == (kind == "cutmix") for d in draws)
    assert all(d.lam == 1.0 for d in draws) == (kind == "none")
    assert BatchMix.enabled(cfg) == (kind != "none") and not BatchMix.enabled(MixConfig())


def test_dominant_label_is_what_train_accuracy_counts():
    x, y = batch()
    for seed in range(20):
        mixer = BatchMix(MixConfig(mixup_alpha=1.0), 5, 10, torch.Generator().manual_seed(seed))
        lam = BatchMix(MixConfig(mixup_alpha=1.0), 5, 10, torch.Generator().manual_seed(seed)).sample().lam
        _, target, dominant = mixer(x, y)
        assert torch.equal(dominant, y if lam >= 0.5 else y.roll(1, 0))
        assert torch.allclose(target.sum(1), torch.ones(8))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_target_loss_smooths_the_mixed_targets_as_timm(smoothing):
    """timm: mixup_target smooths each one-hot (off = s / C, on = 1 - s + off) and mixes them, then
    SoftTargetCrossEntropy; forward_loss's cross-entropy on the mixed target with label_smoothing is the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    x, y = batch(size=4)
    lam, classes = 0.3, 5
    off, on = smoothing / classes, 1 - smoothing + smoothing / classes
    y1 = torch.full((8, classes), off).scatter_(1, y[:, None], on)
    timm_target = y1 * lam + y1.roll(1, 0) * (1 - lam)
    _, target, _ = mix(x, y, MixParams(lam), classes)
    logits, loss = forward_loss(model, x, target, Amp(), smoothing)
    expected = (-timm_target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    _, hard = forward_loss(model, x, y, Amp(), smoothing)  # no mixing: the one-hot target is the hard loss
    _, one_hot = forward_loss(model, x, F.one_hot(y, classes).float(), Amp(), smoothing)
    torch.testing.assert_close(hard, one_hot, atol=1e-6, rtol=0)
