"""CBAM: identity init is an exact pass-through that can still learn; seed init is not a pass-through."""

import pytest
import torch

from cbam_train.models.cbam import CBAM

SHAPES = [(4, 64, 16, 16), (2, 128, 8, 8), (3, 256, 4, 4), (2, 512, 2, 2), (4, 8, 5, 7), (2, 3, 1, 1)]


def max_abs(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_identity_init_is_pass_through(shape):
    torch.manual_seed(0)
    cbam = CBAM(shape[1], reduction=16, kernel_size=7, init="identity")
    x = torch.randn(shape) * 3 + 1
    assert max_abs(cbam(x), x) <= 1e-6


@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_identity_init_pass_through_other_kernels_and_reductions(kernel_size):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 6)
    for reduction in (1, 4, 64):  # 64 > channels: hidden width clamps to 1
        cbam = CBAM(32, reduction=reduction, kernel_size=kernel_size, init="identity")
        assert max_abs(cbam(x), x) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_seed_init_changes_features_substantially(shape):
    torch.manual_seed(0)
    cbam = CBAM(shape[1], init="seed")
    x = torch.randn(shape)
    rel = (cbam(x) - x).norm() / x.norm()
    assert rel.item() > 0.3


def test_gradients_reach_zero_initialised_layers():
    torch.manual_seed(0)
    cbam = CBAM(64, init="identity")
    last_mlp, spatial = cbam.channel.mlp[2], cbam.spatial.conv
    assert torch.count_nonzero(last_mlp.weight) == 0 and torch.count_nonzero(spatial.weight) == 0
    x = torch.randn(4, 64, 8, 8)
    target = torch.randn(4, 64, 8, 8)
    torch.nn.functional.mse_loss(cbam(x), target).backward()
    assert last_mlp.weight.grad is not None and last_mlp.weight.grad.abs().sum().item() > 0
    assert spatial.weight.grad is not None and spatial.weight.grad.abs().sum().item() > 0
    assert spatial.bias.grad is not None and spatial.bias.grad.abs().sum().item() > 0


def test_one_optimizer_step_leaves_identity():
    torch.manual_seed(0)
    cbam = CBAM(64, init="identity")
    x = torch.randn(4, 64, 8, 8)
    assert max_abs(cbam(x), x) <= 1e-6
    opt = torch.optim.SGD(cbam.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(cbam(x), torch.randn_like(x)).backward()
    opt.step()
    with torch.no_grad():
        assert max_abs(cbam(x), x) > 1e-4


@pytest.mark.parametrize("bad", ["Identity", "zeros", "", "kaiming"])
def test_unknown_init_raises_value_error(bad):
    with pytest.raises(ValueError, match="identity, seed"):
        CBAM(64, init=bad)
