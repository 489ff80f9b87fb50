"""ResNetCBAM: shapes, torchvision state-dict compatibility, identity pass-through, CBAM placement, frozen BN."""

import pytest
import torch
import torchvision
from torch import nn

from cbam_train.models.cbam import CBAM
from cbam_train.models.resnet import ResNetCBAM

COMBOS = [(p, i) for p in ("stage", "block") for i in ("identity", "seed")]
COMBO_IDS = [f"{p}-{i}" for p, i in COMBOS]


def backbone(state):
    return {k: v for k, v in state.items() if "cbam" not in k.split(".")}


@pytest.fixture(scope="module")
def tv_state():
    return torchvision.models.resnet18().state_dict()


@pytest.mark.parametrize("placement,init", COMBOS, ids=COMBO_IDS)
def test_output_shape(placement, init):
    torch.manual_seed(0)
    model = ResNetCBAM(num_classes=7, placement=placement, init=init).eval()
    with torch.no_grad():
        for size in (32, 16):
            out = model(torch.randn(4, 3, size, size))
            assert out.shape == (4, 7)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("placement,init", COMBOS, ids=COMBO_IDS)
def test_backbone_keys_are_torchvision_keys(placement, init, tv_state):
    model = ResNetCBAM(placement=placement, init=init)
    state = model.state_dict()
    assert list(backbone(state)) == list(tv_state)  # same names, same order
    assert len(state) > len(tv_state)  # and CBAM adds its own keys


@pytest.mark.parametrize("placement", ["stage", "block"])
def test_imagenet_stem_shapes_match_torchvision_except_fc(placement, tv_state):
    state = backbone(ResNetCBAM(num_classes=10, stem="imagenet", placement=placement).state_dict())
    differ = sorted(k for k in tv_state if state[k].shape != tv_state[k].shape)
    assert differ == ["fc.bias", "fc.weight"]
    assert state["fc.weight"].shape == (10, 512)


@pytest.mark.parametrize("placement", ["stage", "block"])
def test_a_narrower_model_has_every_key_at_its_channels(placement):
    """model.width: the same state-dict keys in the same order as ResNet18's, every stage's channels scaled, fc
    reading 8 x width features; it trains on the same inputs to the same output shape."""
    wide, narrow = (ResNetCBAM(num_classes=10, placement=placement, width=w).state_dict() for w in (64, 8))
    assert list(narrow) == list(wide)
    assert narrow["conv1.weight"].shape == (8, 3, 3, 3) and narrow["layer4.1.bn2.weight"].shape == (64,)
    assert narrow["fc.weight"].shape == (10, 64)
    cbam = "cbam.layer4" if placement == "stage" else "layer4.1.cbam"
    assert narrow[f"{cbam}.channel.mlp.0.weight"].shape == (4, 64, 1, 1)  # 64 // reduction 16
    assert narrow["layer1.0.cbam.channel.mlp.0.weight" if placement == "block" else "cbam.layer1.channel.mlp.0.weight"
                  ].shape == (1, 8, 1, 1)  # at least one hidden unit
    ratio = sum(v.numel() for v in wide.values()) / sum(v.numel() for v in narrow.values())
    assert 60 < ratio < 64  # convolutions scale with width squared; BatchNorm, fc's bias and CBAM's 7x7 less
    model = ResNetCBAM(num_classes=10, placement=placement, width=8)
    loss = model(torch.randn(2, 3, 16, 16)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cifar_stem_differs_from_torchvision_in_conv1_and_fc(tv_state):
    state = backbone(ResNetCBAM(num_classes=10, stem="cifar").state_dict())
    differ = sorted(k for k in tv_state if state[k].shape != tv_state[k].shape)
    assert differ == ["conv1.weight", "fc.bias", "fc.weight"]
    assert state["conv1.weight"].shape == (64, 3, 3, 3)


@pytest.mark.parametrize("placement", ["stage", "block"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_identity_init_model_equals_model_without_cbam(placement, stem):
    torch.manual_seed(0)
    model = ResNetCBAM(stem=stem, placement=placement, init="identity")
    # non-trivial BN statistics so the comparison is not between two near-constant outputs
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    plain = ResNetCBAM(stem=stem, cbam_enabled=False)
    plain.load_state_dict(backbone(model.state_dict()), strict=True)
    model.eval(), plain.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), plain(x)
    assert a.abs().max().item() > 1e-3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("placement", ["stage", "block"])
def test_seed_init_model_differs_from_model_without_cbam(placement):
    torch.manual_seed(0)
    model = ResNetCBAM(placement=placement, init="seed").eval()
    plain = ResNetCBAM(cbam_enabled=False).eval()
    plain.load_state_dict(backbone(model.state_dict()), strict=True)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max().item() > 1e-3


def cbam_module_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, CBAM))


def test_block_placement_puts_cbam_in_every_block():
    model = ResNetCBAM(placement="block")
    expected = sorted(f"layer{k}.{i}.cbam" for k in range(1, 5) for i in range(2))
    assert cbam_module_names(model) == expected
    assert len(expected) == 8
    assert not hasattr(model, "cbam")
    channels = {n: m.channel.mlp[0].in_channels for n, m in model.named_modules() if isinstance(m, CBAM)}
    assert channels["layer1.0.cbam"] == 64 and channels["layer4.1.cbam"] == 512


def test_stage_placement_puts_cbam_after_each_stage():
    model = ResNetCBAM(placement="stage")
    assert cbam_module_names(model) == ["cbam.layer1", "cbam.layer2", "cbam.layer3", "cbam.layer4"]
    assert [model.cbam[f"layer{k}"].channel.mlp[0].in_channels for k in range(1, 5)] == [64, 128, 256, 512]


def test_cbam_disabled_has_no_cbam():
    for placement in ("stage", "block"):
        model = ResNetCBAM(cbam_enabled=False, placement=placement)
        assert cbam_module_names(model) == []
        assert not any("cbam" in k for k in model.state_dict())


def test_identity_cbam_keeps_zero_init_inside_model():
    # _init_backbone must not re-initialise the CBAM's zeroed layers
    for placement in ("stage", "block"):
        model = ResNetCBAM(placement=placement, init="identity")
        cbams = [m for m in model.modules() if isinstance(m, CBAM)]
        assert cbams
        for m in cbams:
            assert torch.count_nonzero(m.channel.mlp[2].weight) == 0
            assert torch.count_nonzero(m.spatial.conv.weight) == 0


@pytest.mark.parametrize("kwargs,match", [({"stem": "tiny"}, "cifar, imagenet"),
                                          ({"placement": "everywhere"}, "stage, block")])
def test_invalid_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNetCBAM(**kwargs)


def bn_modes(module):
    return [m.training for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("placement", ["stage", "block"])
def test_freeze_bn_keeps_frozen_batchnorm_in_eval(placement):
    model = ResNetCBAM(placement=placement)
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    model.train()
    assert bn_modes(model.layer1) and not any(bn_modes(model.layer1))
    assert bn_modes(model.layer4) and all(bn_modes(model.layer4))
    assert model.bn1.training
    assert model.training and model.layer1.training  # only the BN layers are held in eval


def test_freeze_bn_off_keeps_all_batchnorm_in_train():
    model = ResNetCBAM()
    model.freeze_bn = False
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    model.train()
    assert all(bn_modes(model))


def test_eval_puts_every_batchnorm_in_eval():
    model = ResNetCBAM()
    model.train()
    model.eval()
    assert not any(bn_modes(model))
