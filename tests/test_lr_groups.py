"""Learning rates per module within a stage (schedule.param_groups): lr_mult, layer_decay, their product, one
param group per distinct lr, deeper module paths, and what the optimizer and its schedule then do."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from cbam_train.config.errors import ConfigError
from cbam_train.config.schema import SchedConfig, StageConfig
from cbam_train.models.resnet import ResNetCBAM
from cbam_train.training.optim import build_optimizer, stage_lr
from cbam_train.training.schedule import (
    apply_stage,
    check_trainable,
    depth_of,
    lr_multiplier,
    param_groups,
    resolve_stages,
    stage_scheduler,
    trainable_parameters,
)
from cbam_train.training.startup import stage_table_rows


def stage_of(lr: float = 1e-3, trainable=("all",), lr_mult=None, layer_decay=None, sched=None, select_lr=None):
    cfg = StageConfig(epochs=2, lr=lr, trainable=list(trainable), lr_mult=dict(lr_mult or {}),
                      layer_decay=layer_decay, sched=sched or SchedConfig())
    return resolve_stages({"s": cfg}, lr=select_lr)[0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ResNetCBAM(num_classes=10)


def test_depth_order_for_layer_decay_and_cbam_takes_its_layers():
    assert [depth_of(p) for p in ("fc.weight", "layer4.1.conv2.weight", "layer3.0.bn1.bias", "layer2.0.conv1.weight",
                                  "layer1.1.conv1.weight", "conv1.weight", "bn1.weight")] == [0, 1, 2, 3, 4, 5, 5]
    assert depth_of("cbam.layer3.channel.mlp.0.weight") == 2  # placement=stage: after layer3
    assert depth_of("layer2.1.cbam.spatial.conv.weight") == 3  # placement=block: inside layer2


def test_lr_mult_and_layer_decay_multiply_and_the_deeper_path_wins():
    st = stage_of(lr_mult={"layer4": 0.2, "layer4.1": 0.5, "layer1": 0.1}, layer_decay=0.5)
    assert lr_multiplier("fc.weight", st) == 1.0
    assert lr_multiplier("layer4.0.conv1.weight", st) == pytest.approx(0.2 * 0.5)
    assert lr_multiplier("layer4.1.conv1.weight", st) == pytest.approx(0.5 * 0.5)  # layer4.1 beats layer4
    assert lr_multiplier("cbam.layer4.spatial.conv.weight", st) == pytest.approx(0.5)  # unlisted: 1.0 x decay
    assert lr_multiplier("layer1.0.conv1.weight", st) == pytest.approx(0.1 * 0.5 ** 4)
    assert lr_multiplier("conv1.weight", st) == pytest.approx(0.5 ** 5)
    only_mult = stage_of(lr_mult={"cbam": 3.0, "layer2": 0.5})
    assert lr_multiplier("layer2.0.cbam.channel.mlp.0.weight", only_mult) == 3.0  # 'cbam' beats a top-level name
    assert lr_multiplier("layer2.0.conv1.weight", only_mult) == 0.5 and lr_multiplier("fc.bias", only_mult) == 1.0


def test_one_param_group_per_distinct_lr_covering_exactly_the_trainable_parameters(model):
    st = stage_of(lr=2e-3, trainable=["fc", "cbam", "layer3", "layer4"], lr_mult={"layer3": 0.1}, layer_decay=0.5)
    groups = param_groups(model, st)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = dict(model.named_parameters())
    expected = [id(trainable[n]) for n in trainable_parameters(model, st.trainable)]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))  # each trainable parameter once
    assert len({g["lr"] for g in groups}) == len(groups)  # distinct lrs
    by_name = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_mult"])
        assert all(lr_multiplier(by_name[id(p)], st) == g["lr_mult"] for p in g["params"])
    # fc 1.0; layer4 + cbam.layer4 0.5; layer3 0.1*0.25 (lr_mult names layer3 only); cbam.layer3 0.25;
    # cbam.layer2 0.125; cbam.layer1 0.0625
    assert sorted(g["lr_mult"] for g in groups) == pytest.approx(sorted([1.0, 0.5, 0.025, 0.25, 0.125, 0.0625]))
    assert [m for g in groups for m in g["modules"]].count("layer3") == 1
    assert len(param_groups(model, stage_of())) == 1  # no lr_mult, no layer_decay: one group, as before


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_the_in_stage_schedule_scales_every_group_alike_and_lr_scales_the_stage(model, optim):
    sched = SchedConfig("cosine", warmup_epochs=1.0, min_lr_ratio=0.1)
    st = stage_of(lr=1e-3, lr_mult={"layer4": 0.3}, layer_decay=0.7, sched=sched, select_lr=4e-3)
    assert st.lr == 4e-3  # lr= sets the (first) stage's lr; the multipliers follow it
    apply_stage(model, st.trainable)
    opt = build_optimizer(param_groups(model, st), compose_config([f"optim={optim}", "data.root=/x"]).optim, st.lr)
    scheduler = stage_scheduler(opt, st, steps_per_epoch=3)
    for _ in range(5):
        base = stage_lr(opt)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base * g["lr_mult"], rel=1e-12)
        opt.step()
        scheduler.step()
    assert stage_lr(opt) < 4e-3  # the cosine has moved the stage's lr


def test_a_stage_trains_any_module_path(model):
    check_trainable(model, {"s": StageConfig(trainable=["layer4.1", "layer3.0.conv1", "fc"])})
    params = apply_stage(model, ["layer4.1", "layer3.0.conv1", "fc"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in dict(model.named_parameters())
                     if n.startswith(("layer4.1.", "layer3.0.conv1.", "fc."))}
    assert len(params) == len(names)


@pytest.mark.parametrize("stage, message", [
    (StageConfig(trainable=["layer5"]), r"trainable: unknown module 'layer5'; known: conv1, bn1, layer1, .*"
                                        r"deeper paths work too, e.g. layer4.1"),
    (StageConfig(trainable=["fc"], lr_mult={"layer9.0": 0.1}), r"s.lr_mult.layer9.0: unknown module 'layer9.0'; "
                                                               r"known: .*; deeper paths work too"),
    (StageConfig(trainable=["fc", "cbam"], lr_mult={"layer1": 0.1}),
     r"s.lr_mult.layer1: layer1 does not train in this stage \(trainable: fc, cbam\)"),
])
def test_unknown_or_frozen_module_paths_are_refused_at_start_up(model, stage, message):
    with pytest.raises(ConfigError, match=message):
        check_trainable(model, {"s": stage})


@pytest.mark.parametrize("override, message", [
    ("+schedule.stages.high.lr_mult.layer4=0", r"schedule.stages.high.lr_mult.layer4 must be > 0, got 0"),
    ("+schedule.stages.high.lr_mult.layer4=-1", r"schedule.stages.high.lr_mult.layer4 must be > 0"),
    ("+schedule.stages.high.lr_mult.layer4=nan", r"schedule.stages.high.lr_mult.layer4 must be a finite number"),
    ("schedule.stages.full.layer_decay=0", r"schedule.stages.full.layer_decay must be null or in \(0, 1\], got 0"),
    ("schedule.stages.full.layer_decay=1.5", r"layer_decay must be null or in \(0, 1\], got 1.5"),
    ("schedule.stages.full.layer_decay=inf", r"schedule.stages.full.layer_decay must be a finite number"),
])
def test_bad_multipliers_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([override, "data.root=/x"])


def test_the_stage_table_lists_each_groups_lr(model):
    [row] = stage_table_rows(model, [stage_of(lr=1e-3, trainable=["fc", "cbam", "layer4"],
                                              lr_mult={"layer4": 0.1})])
    assert row["lr_groups"] == [{"lr": pytest.approx(1e-4), "modules": ["layer4"]},
                                {"lr": 1e-3, "modules": ["fc", "cbam"]}]
