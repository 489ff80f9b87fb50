"""Staged unfreezing: stage selection, lr per stage, which parameters train, and what frozen really means."""

import pytest
import torch
from torch import nn

from cbam_train.config.errors import ConfigError
from cbam_train.config.schema import StageConfig
from cbam_train.models.resnet import ResNetCBAM
from cbam_train.training import engine
from cbam_train.training.optim import build_optimizer
from cbam_train.training.schedule import (
    apply_stage,
    check_trainable,
    frozen_new_modules,
    resolve_stages,
    trainable_parameters,
)

BACKBONE = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")


@pytest.fixture
def seed_stages(make_cfg):
    return make_cfg([]).schedule.stages


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ResNetCBAM(num_classes=10)


def top(name):
    return name.split(".")[0]


def names_where(model, pred):
    return {n for n, _ in model.named_parameters() if pred(n)}


def count(model, names):
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


# --- resolve_stages -----------------------------------------------------------------------------

def test_seed_schedule_is_what_the_tests_assume(seed_stages):
    assert list(seed_stages) == ["head", "high", "full"]
    assert [s.epochs for s in seed_stages.values()] == [5, 15, 30]
    assert [s.lr for s in seed_stages.values()] == pytest.approx([1e-3, 1e-4, 1e-5])


def test_resolve_all(seed_stages):
    stages = resolve_stages(seed_stages, "all")
    assert [s.name for s in stages] == ["head", "high", "full"]
    assert [s.index for s in stages] == [1, 2, 3]
    assert [s.epochs for s in stages] == [5, 15, 30]
    assert [s.lr for s in stages] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert [s.first_epoch for s in stages] == [1, 6, 21]
    assert stages[0].trainable == ("fc", "cbam")
    assert stages[1].trainable == ("fc", "cbam", "layer3", "layer4")
    assert stages[2].trainable == ("all",)


@pytest.mark.parametrize("select,name,index,first_epoch", [("2", "high", 2, 6), ("high", "high", 2, 6),
                                                            ("full", "full", 3, 21), ("1", "head", 1, 1),
                                                            (3, "full", 3, 21)])
def test_resolve_single_stage(seed_stages, select, name, index, first_epoch):
    (st,) = resolve_stages(seed_stages, select)
    assert (st.name, st.index, st.first_epoch) == (name, index, first_epoch)
    assert st.lr == pytest.approx(seed_stages[name].lr)  # no lr override: the stage's own lr


@pytest.mark.parametrize("select,what", [("4", "out of range"), ("0", "out of range"), ("99", "out of range"),
                                         ("middle", "unknown stage"), ("Head", "unknown stage"),
                                         ("-1", "unknown stage")])
def test_bad_stage_selection_lists_the_stages(seed_stages, select, what):
    with pytest.raises(ConfigError) as e:
        resolve_stages(seed_stages, select)
    msg = str(e.value)
    assert what in msg and f"stage={select}" in msg
    assert "1=head, 2=high, 3=full" in msg


def test_lr_override_scales_all_stages(seed_stages):
    stages = resolve_stages(seed_stages, "all", lr=2e-3)
    assert [s.lr for s in stages] == pytest.approx([2e-3, 2e-4, 2e-5])


def test_lr_override_sets_the_selected_stage(seed_stages):
    (st,) = resolve_stages(seed_stages, "2", lr=3e-4)
    assert st.lr == pytest.approx(3e-4)
    (st,) = resolve_stages(seed_stages, "full", lr=5e-5)
    assert st.lr == pytest.approx(5e-5)


def test_resolve_does_not_mutate_config(seed_stages):
    resolve_stages(seed_stages, "all", lr=2e-3)
    assert [s.lr for s in seed_stages.values()] == pytest.approx([1e-3, 1e-4, 1e-5])


# --- which parameters train -------------------------------------------------------------------

def test_head_trains_fc_and_cbam(model, seed_stages):
    expected = names_where(model, lambda n: top(n) in ("fc", "cbam"))
    assert any(n.startswith("cbam.layer4.") for n in expected) and "fc.weight" in expected
    got = trainable_parameters(model, seed_stages["head"].trainable)
    assert len(got) == len(set(got)) and set(got) == expected
    params = apply_stage(model, seed_stages["head"].trainable)
    assert sum(p.numel() for p in params) == count(model, expected)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count(model, expected)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in expected), n


def test_high_adds_layer3_and_layer4(model, seed_stages):
    expected = names_where(model, lambda n: top(n) in ("fc", "cbam", "layer3", "layer4"))
    assert set(trainable_parameters(model, seed_stages["high"].trainable)) == expected
    params = apply_stage(model, seed_stages["high"].trainable)
    assert sum(p.numel() for p in params) == count(model, expected)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == names_where(model, lambda n: top(n) in ("conv1", "bn1", "layer1", "layer2"))


def test_full_trains_everything(model, seed_stages):
    every = [n for n, _ in model.named_parameters()]
    assert trainable_parameters(model, seed_stages["full"].trainable) == every  # model order
    apply_stage(model, ["fc"])  # freeze first, so 'all' has to unfreeze
    params = apply_stage(model, seed_stages["full"].trainable)
    assert len(params) == len(every)
    assert all(p.requires_grad for p in model.parameters())


def test_cbam_entry_selects_in_block_cbams():
    model = ResNetCBAM(placement="block")
    expected = names_where(model, lambda n: ".cbam." in n)
    assert len({n.split(".cbam.")[0] for n in expected}) == 8  # layerK.i for all 8 blocks
    assert set(trainable_parameters(model, ["cbam"])) == expected
    apply_stage(model, ["cbam"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_entry_matches_whole_module_names_only(model):
    # 'layer1' must not select layer10-style names, and 'fc' must not select anything but fc.*
    assert set(trainable_parameters(model, ["layer1"])) == names_where(model, lambda n: top(n) == "layer1")
    assert trainable_parameters(model, ["layer"]) == []
    assert set(trainable_parameters(model, ["layer1.0"])) == names_where(model, lambda n: n.startswith("layer1.0."))


def test_check_trainable_accepts_seed_schedule(model, seed_stages):
    check_trainable(model, seed_stages)  # raises on failure


def test_check_trainable_unknown_module_lists_known(model):
    stages = {"head": StageConfig(trainable=["fc"]), "high": StageConfig(trainable=["fc", "layer5"])}
    with pytest.raises(ConfigError) as e:
        check_trainable(model, stages)
    msg = str(e.value)
    assert "schedule.stages.high.trainable" in msg and "'layer5'" in msg
    assert "conv1" in msg and "layer4" in msg


# --- frozen means frozen -----------------------------------------------------------------------

def test_frozen_parameters_get_no_gradient(model, seed_stages):
    apply_stage(model, seed_stages["head"].trainable)
    model.train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert model.fc.weight.grad.abs().sum() > 0


def test_apply_stage_reapplies_batchnorm_modes_on_a_training_model(model):
    # the run calls apply_stage between epochs with the model already in train mode
    bns = lambda mod: [m.training for m in mod.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    apply_stage(model, ["fc", "cbam", "layer4"])
    assert not any(bns(model.layer1)) and all(bns(model.layer4))
    apply_stage(model, ["all"])
    assert all(bns(model))
    apply_stage(model, ["fc"], freeze_bn=False)
    assert all(bns(model))


def bn_buffers(model, frozen_tops):
    return {n: b.clone() for n, b in model.named_buffers() if top(n) in frozen_tops}


def run_epoch(model, trainable, freeze_bn):
    params = apply_stage(model, trainable, freeze_bn=freeze_bn)
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    loader = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen))
              for _ in range(2)]
    calls = []
    setup = engine.EpochSetup(torch.device("cpu"), on_step=lambda *a, **k: calls.append(a), every_n_steps=1,
                             where="test")
    out = engine.train_one_epoch(model, loader, opt, setup)
    assert out.n == 8 and len(calls) == 2
    return out


FROZEN_TOPS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def test_frozen_batchnorm_stats_and_weights_unchanged_after_epoch(model):
    buffers = bn_buffers(model, FROZEN_TOPS)
    assert any(n.endswith("running_var") for n in buffers) and any(n.endswith("num_batches_tracked") for n in buffers)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_epoch(model, ["fc", "cbam"], freeze_bn=True)
    for n, b in model.named_buffers():
        if n in buffers:
            assert torch.equal(b, buffers[n]), n
    for n, p in model.named_parameters():
        if top(n) in ("fc", "cbam"):
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"


def test_without_freeze_bn_frozen_batchnorm_stats_change(model):
    buffers = bn_buffers(model, FROZEN_TOPS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_epoch(model, ["fc", "cbam"], freeze_bn=False)
    now = dict(model.named_buffers())
    for n, b in buffers.items():
        assert not torch.equal(now[n], b), n
    assert now["layer1.0.bn1.num_batches_tracked"].item() == 2
    for n, p in model.named_parameters():  # BN affine weights stay frozen either way
        if top(n) in FROZEN_TOPS:
            assert torch.equal(p, before[n]), n


def test_trainable_batchnorm_keeps_updating_stats_under_freeze_bn(model):
    before = bn_buffers(model, ("layer4", "layer1"))
    run_epoch(model, ["fc", "cbam", "layer4"], freeze_bn=True)
    now = dict(model.named_buffers())
    assert now["layer4.1.bn2.num_batches_tracked"].item() == 2
    assert not torch.equal(now["layer4.1.bn2.running_mean"], before["layer4.1.bn2.running_mean"])
    assert torch.equal(now["layer1.0.bn1.running_mean"], before["layer1.0.bn1.running_mean"])


# --- frozen_new_modules ----------------------------------------------------------------------

def test_frozen_new_modules_reports_stages_keeping_random_modules_frozen(model, seed_stages):
    stages = resolve_stages(seed_stages, "all")
    assert frozen_new_modules(stages, ["conv1", "fc", "cbam"], model) == {"head": ["conv1"], "high": ["conv1"]}


def test_frozen_new_modules_empty_when_first_stage_trains_them(model, make_cfg):
    cfg = make_cfg(["schedule.stages.head.trainable=[fc,cbam,conv1]"])
    stages = resolve_stages(cfg.schedule.stages, "all")
    assert stages[0].trainable == ("fc", "cbam", "conv1")
    assert frozen_new_modules(stages, ["conv1", "fc", "cbam"], model) == {}


def test_frozen_new_modules_nothing_new(model, seed_stages):
    assert frozen_new_modules(resolve_stages(seed_stages, "all"), [], model) == {}


# --- build_optimizer -------------------------------------------------------------------------

@pytest.mark.parametrize("optim,cls", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_build_optimizer_gets_exactly_the_params_and_lr(model, make_cfg, seed_stages, optim, cls):
    cfg = make_cfg([f"optim={optim}"])
    params = apply_stage(model, seed_stages["head"].trainable)
    opt = build_optimizer(params, cfg.optim, 3e-4)
    assert type(opt) is cls
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in params]
    assert group["lr"] == 3e-4
    assert group["weight_decay"] == cfg.optim.weight_decay
    if optim == "sgd":
        assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    else:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8


def test_a_stage_that_selects_nothing_is_refused_at_start_up(make_cfg):
    cfg = make_cfg(["model.cbam.enabled=false", "schedule.stages.head.trainable=[cbam]"])
    model = ResNetCBAM(cbam_enabled=False)
    with pytest.raises(ConfigError, match=r"schedule.stages.head.trainable=\['cbam'\] selects no parameters"):
        check_trainable(model, cfg.schedule.stages)
    # the seed schedule names cbam beside other modules: still fine without CBAM
    check_trainable(model, make_cfg(["model.cbam.enabled=false"]).schedule.stages)
