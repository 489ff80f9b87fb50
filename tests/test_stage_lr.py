"""The lr inside a stage: warm-up, cosine and step schedules (lr_factor, stage_scheduler) and their keys."""

import math

import pytest
import torch
from torch import nn

from cbam_train.config.schema import StageConfig
from cbam_train.training.schedule import Stage, resolve_stages

# --- the lr inside a stage --------------------------------------------------------------------------

def _stage(epochs: int, sched: str = "constant", warmup_epochs: float = 0.0, **kw) -> Stage:
    return Stage(index=1, name="a", epochs=epochs, lr=1.0, trainable=("all",), first_epoch=1, sched=sched,
                 warmup_epochs=warmup_epochs, **kw)


def test_lr_factor_warmup_then_constant_or_cosine():
    from cbam_train.training.schedule import lr_factor

    # 1 step per epoch: stage steps == epochs
    assert [lr_factor(k, _stage(10, "constant", 4), 1) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_factor(k, _stage(10, "cosine", 2, min_lr_ratio=0.1), 1) for k in range(10)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:], strict=False))  # decreasing after the warm-up
    assert lr_factor(7, _stage(10, "cosine"), 1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 9)))


def test_lr_factor_step_drops_by_gamma_every_step_size_epochs_of_the_stage():
    from cbam_train.training.schedule import lr_factor

    stage = _stage(7, "step", step_size=3, gamma=0.5)
    per_epoch = [[lr_factor(k, stage, 4) for k in range(e * 4, e * 4 + 4)] for e in range(7)]
    assert per_epoch == [[1.0] * 4] * 3 + [[0.5] * 4] * 3 + [[0.25] * 4]  # constant inside an epoch
    warm = _stage(7, "step", 1.0, step_size=3, gamma=0.5)  # warm-up first, then the drops on the stage's epochs
    assert [lr_factor(k, warm, 4) for k in (0, 3, 4, 11, 12)] == [0.25, 1.0, 1.0, 1.0, 0.5]


@pytest.mark.parametrize("step_size, gamma, epochs, steps_per_epoch", [(10, 0.1, 50, 3), (3, 0.5, 11, 1),
                                                                        (1, 0.9, 20, 2)])
def test_step_schedule_is_torch_steplr_stepped_per_epoch(step_size, gamma, epochs, steps_per_epoch):
    """The stage's lr at every step equals torch's StepLR stepped once per epoch. Both are float64: ours is
    lr * gamma**k, StepLR's k repeated multiplications, so they may differ by a few roundings (< 1e-15
    relative for k <= 5 drops); 1e-12 leaves room for that and nothing else."""
    from cbam_train.config.schema import SchedConfig
    from cbam_train.training.schedule import stage_scheduler

    cfg = StageConfig(epochs=epochs, lr=1e-3, sched=SchedConfig("step", step_size=step_size, gamma=gamma))
    st = resolve_stages({"a": cfg})[0]
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    ours, theirs = torch.optim.Adam([p], lr=st.lr), torch.optim.Adam([q], lr=1e-3)
    sched = stage_scheduler(ours, st, steps_per_epoch)
    step_lr = torch.optim.lr_scheduler.StepLR(theirs, step_size=step_size, gamma=gamma)
    for _epoch in range(epochs):
        for _ in range(steps_per_epoch):
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12, abs=0)
            ours.step()
            sched.step()
            theirs.step()
        step_lr.step()


def test_stage_scheduler_steps_the_optimizer_lr_per_step():
    from cbam_train.config.schema import SchedConfig
    from cbam_train.training.schedule import stage_scheduler

    st = resolve_stages({"a": StageConfig(epochs=2, lr=0.4, sched=SchedConfig("cosine", 1.0, 0.0))})[0]
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=st.lr)
    sched = stage_scheduler(opt, st, steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4]) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    st_const = resolve_stages({"a": StageConfig(epochs=2, lr=0.4)})[0]
    assert stage_scheduler(opt, st_const, 4) is None  # constant lr: no scheduler, the step is unchanged


def test_sched_validation_names_the_stage():
    from conftest import compose_config

    from cbam_train.config.errors import ConfigError

    with pytest.raises(ConfigError, match="schedule.stages.head.sched.name: unknown value 'linear'"):
        compose_config(["schedule.stages.head.sched.name=linear"])
    with pytest.raises(ConfigError, match="warmup_epochs=9.0 is longer than the stage"):
        compose_config(["schedule.stages.head.sched.warmup_epochs=9"])
    with pytest.raises(ConfigError, match=r"schedule.stages.full.sched.step_size must be >= 1 \(epochs\), got 0"):
        compose_config(["schedule.stages.full.sched.name=step", "schedule.stages.full.sched.step_size=0"])
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=rf"schedule.stages.high.sched.gamma must be in \(0, 1\], got {bad}"):
            compose_config([f"schedule.stages.high.sched.gamma={bad}"])
