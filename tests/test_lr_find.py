"""task=lr_find: the lr sequence, every group's ratio, the smoothing and the early stop, the files it writes (and
the weights it does not), the weights it starts from, and that its suggestion trains better than 100x or 1/100."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import NARROW, assert_same_state, compose_config
from PIL import Image

from cbam_train.config.errors import UserError
from cbam_train.tasks.lr_find import override_for, run_lr_find
from cbam_train.training import range_test as ranges
from cbam_train.training import session
from cbam_train.training.range_test import FLAT_FALL, local_lines, lr_schedule, suggest

# 80 training images in batches of 16: 5 batches an epoch, so 10 steps go through the loader twice
TINY = ["experiment=smoke", NARROW, "task=lr_find", "data.image_size=8", "data.train_size=96", "data.val_size=16",
        "data.test_size=16", "data.batch_size=16", "log.mode=plain", "lr_find.steps=10"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ema(losses: list, beta: float) -> list:
    """The bias-corrected EMA, written out independently of range_test.range_test."""
    out, avg = [], 0.0
    for k, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** k))
    return out


def state_copy(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_lr_sequence_is_exponential_from_min_lr_to_max_lr():
    lrs = lr_schedule(1e-6, 1e-1, 51)
    assert len(lrs) == 51 and lrs[0] == 1e-6 and lrs[-1] == pytest.approx(1e-1, rel=1e-12)
    ratio = (1e-1 / 1e-6) ** (1 / 50)  # the same factor between every pair of neighbours: 10^(5/50)
    assert all(b / a == pytest.approx(ratio, rel=1e-12) for a, b in zip(lrs, lrs[1:], strict=False))


def test_suggest_takes_the_steepest_descent_before_the_minimum():
    lrs = lr_schedule(1e-6, 1.0, 100)

    def curve(i: int) -> float:  # a fall steepest at step 40, the bottom at 70, a spike, then a steeper fall
        return 2.0 - math.tanh((i - 40) / 6) if i <= 70 else 1.0 + 0.75 * (i - 70) if i <= 74 else 4.0 - 0.25 * (i - 74)

    loss = [curve(i) for i in range(88)]
    s = suggest(lrs, loss, planned_steps=100)
    assert s["method"] == "steepest_before_min" and s["index"] == 40 and s["lr"] == lrs[40]
    assert s["inputs"]["window_steps"] == 17 and s["inputs"]["searched"][0] == 10  # 1/6 of the steps; 10% skipped
    level, slope = local_lines(np.array(loss), np.log10(lrs[:88]), 8)
    steepest = int(np.nanargmin(slope))  # the fall after the spike is steeper, but after the minimum: not taken
    assert steepest > s["inputs"]["min_index"] > 40 and slope[steepest] < s["inputs"]["slope_per_decade"]
    assert s["inputs"]["slope_per_decade"] == pytest.approx(slope[40])
    # one batch far below the rest moves a fitted slope a little; the EMA's slope would jump to it
    odd = list(loss[:70])
    odd[25] -= 0.5
    assert abs(suggest(lrs, odd, planned_steps=100)["index"] - 40) <= 2
    assert suggest(lrs, loss[:60] + [None], 100) == suggest(lrs[:60], loss[:60], 100)  # a non-finite tail is cut
    rising = [1.0 + 0.01 * i for i in range(50)]  # no descent at all: the minimum / 10, and it says so
    s = suggest(lrs, rising, planned_steps=100)
    assert s["method"] == "min_div_10" and s["lr"] == pytest.approx(lrs[10] / 10) and "no descent" in s["inputs"]["why"]


def test_a_fall_within_the_noise_is_flat_and_the_lr_is_where_the_loss_starts_to_rise_over_10():
    """A trained network's next stage: the loss flat (noise sd 0.1 per step) until step 70, then rising 0.02 per
    step. A window of 17 steps fits its level to 0.1/sqrt(17) = 0.024, so the noise's lowest level sits some
    0.06 below the flat and the edge (3 of those, 0.073, above it) is crossed within 5 steps of the rise's start
    give or take 3 for the noise: steps 66..80. The same noise over a real fall of 1.0 keeps the steepest descent."""
    lrs = lr_schedule(1e-7, 1.0, 100)
    for seed in range(5):
        noise = np.random.default_rng(seed).normal(0.0, 0.1, 100)
        flat = [1.7 + 0.02 * max(0, i - 70) + noise[i] for i in range(100)]
        s = suggest(lrs, flat, planned_steps=100)
        assert s["method"] == "flat_edge_div_10", (seed, s)
        assert 66 <= s["index"] <= 80 and s["lr"] == pytest.approx(lrs[s["index"]] / 10), (seed, s["index"])
        assert s["inputs"]["fall"] < FLAT_FALL * s["inputs"]["level_se"] and 0.015 < s["inputs"]["level_se"] < 0.035
        falling = [2.7 - math.tanh((i - 40) / 6) + 0.02 * max(0, i - 70) + noise[i] for i in range(100)]
        assert suggest(lrs, falling, planned_steps=100)["method"] == "steepest_before_min", seed


def test_the_override_printed_sets_the_swept_stage_lr():
    assert override_for(compose_config(TINY), "high", 3.21e-4) == "schedule.stages.high.lr=3.2e-04"
    # with lr= on the command line, that sets the first running stage's lr and would win over the stage's key
    assert override_for(compose_config(TINY + ["lr=1e-3"]), "head", 3.21e-4) == "lr=3.2e-04"
    # schedule=auto runs the test itself at each stage's start and refuses both overrides: none is printed
    assert override_for(compose_config(["schedule=auto", "data.root=/x"]), "head", 3.21e-4) is None


def test_the_sweep_trains_the_stage_as_training_would_with_every_group_at_its_ratio(monkeypatch, tmp_path):
    """stage=high with layer_decay: several param groups; each step's group lrs are lr_i x lr_mult; only the
    stage's parameters change and the frozen modules' BatchNorm statistics stay put (schedule.freeze_bn)."""
    seen = {}
    real_build, real_sweep = session.build_optimizer, ranges.range_test

    def build(groups, cfg, lr):
        opt = real_build(groups, cfg, lr)
        seen["steps"] = []
        opt.register_step_pre_hook(lambda o, args, kwargs: seen["steps"].append([g["lr"] for g in o.param_groups]))
        seen["mults"] = [g["lr_mult"] for g in opt.param_groups]
        return opt

    def spy(model, *args):
        seen["before"] = state_copy(model)
        result = real_sweep(model, *args)
        seen["after"] = state_copy(model)
        return result

    monkeypatch.setattr(session, "build_optimizer", build)
    monkeypatch.setattr(ranges, "range_test", spy)
    # reduction 4: at model.width=8 the default 16 leaves CBAM's channel MLP one hidden unit, which a ReLU can keep
    # at zero for a whole sweep; then its first layer would not change although it trains
    cfg = compose_config(TINY + ["stage=high", "schedule.stages.high.layer_decay=0.5", "lr_find.max_lr=1e-2",
                                 "model.cbam.reduction=4"])
    out = run_lr_find(cfg, tmp_path / "run")
    assert out["stage"]["name"] == "high" and out["steps_run"] == 10 and not out["stopped_early"]
    mults = seen["mults"]
    # fc x1, layer4 x0.5, layer3 x0.25; CBAM after layer1..layer4 follows its layer: x0.0625 .. x0.5
    assert sorted(mults) == [0.0625, 0.125, 0.25, 0.5, 1.0]
    assert [g["lr_mult"] for g in out["lr_groups"]] == mults
    assert len(seen["steps"]) == 10
    for lr, group_lrs in zip(lr_schedule(1e-7, 1e-2, 10), seen["steps"], strict=False):
        assert group_lrs == pytest.approx([lr * m for m in mults], rel=1e-12)
    before, after = seen["before"], seen["after"]
    trains = ("fc.", "cbam.", "layer3.", "layer4.")
    for key in (k for k in before if not k.endswith("num_batches_tracked")):
        changed = not torch.equal(before[key], after[key])
        assert changed == key.startswith(trains), key  # frozen weights and frozen BN statistics unchanged
    assert out["smoothed"] == pytest.approx(ema(out["losses"], out["settings"]["smooth"]), rel=1e-9)


def test_a_diverging_sweep_stops_early_and_records_where(tmp_path, capsys):
    # Adam on a BatchNorm network survives lr 100 for a few steps; by 1e3 the loss runs away (~step 13 of 20)
    cfg = compose_config(TINY + ["lr_find.steps=20", "lr_find.min_lr=1e-2", "lr_find.max_lr=1e6"])
    out = run_lr_find(cfg, tmp_path / "run")
    stop = out["stop"]
    assert out["stopped_early"] and stop["step"] == out["steps_run"] < 20
    assert out["lrs"] == pytest.approx(lr_schedule(1e-2, 1e6, 20)[:stop["step"]], rel=1e-12)
    assert len(out["losses"]) == len(out["smoothed"]) == stop["step"] and stop["lr"] == out["lrs"][-1]
    finite = [s for s in out["smoothed"] if s is not None]
    if stop["reason"] == "diverged":  # the first step whose smoothed loss passed 4x the best so far
        assert finite[-1] > 4.0 * min(finite) and stop["best_smoothed_loss"] == min(finite)
        assert all(s <= 4.0 * min(finite[:k + 1]) for k, s in enumerate(finite[:-1]))
        assert out["smoothed"] == pytest.approx(ema(out["losses"], 0.9), rel=1e-9)  # the default smoothing
    else:
        assert stop["reason"] == "non-finite" and out["losses"][-1] is None
    saved = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    assert saved["stop"] == stop and saved["stopped_early"]
    assert f"stopped at step {stop['step']}/20" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`cbam-train task=lr_find` through cli.main, in this process: (run dir, console output, lr_find.json)."""
    from cbam_train.cli import command

    run = tmp_path_factory.mktemp("lr_find") / "run"
    patch, console = pytest.MonkeyPatch(), io.StringIO()
    patch.setattr("sys.argv", ["cbam-train", *TINY, "lr_find.steps=20", f"hydra.run.dir={run}"])
    try:
        with contextlib.redirect_stdout(console):
            command.main()
    finally:
        patch.undo()
    return run, console.getvalue(), json.loads((run / "lr_find.json").read_text())


def test_writes_json_and_png_and_no_weights(cli_run):
    run, console, out = cli_run
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert files == [".hydra/config.yaml", ".hydra/overrides.yaml", "lr_find.json", "lr_find.png", "train.log"]
    assert out["stage"]["name"] == "head"  # stage=all: the first stage that runs
    n = out["steps_run"]
    assert n == 20 and len(out["lrs"]) == len(out["losses"]) == len(out["smoothed"]) == n
    assert out["lrs"] == pytest.approx(lr_schedule(1e-7, 1.0, 20), rel=1e-12)
    s = out["suggestion"]
    # at the steepest step, or a tenth of the minimum's or the flat's edge's lr (20 steps on 80 images: either)
    divisor = 1 if s["method"] == "steepest_before_min" else 10
    assert 1e-8 <= s["lr"] <= 1.0 and s["lr"] == out["lrs"][s["index"]] / divisor
    assert suggest(out["lrs"], out["losses"], 20) == {k: v for k, v in s.items() if k != "override"}
    assert s["override"] == f"schedule.stages.head.lr={s['lr']:.1e}"
    assert f"to use it: {s['override']}" in console and f"suggested lr: {s['lr']:.1e}" in console
    png = (run / "lr_find.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(run / "lr_find.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_a_run_dir_with_results_is_refused(cli_run, tmp_path):
    run, _, _ = cli_run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="already holds a run"):
        run_lr_find(compose_config(TINY), run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "lr_find.json").write_text("{}")  # an lr_find's results alone are enough to refuse
    with pytest.raises(UserError, match="already holds a run"):
        run_lr_find(compose_config(TINY), tmp_path / "r")
    assert (tmp_path / "r" / "lr_find.json").read_text() == "{}"


def test_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="runs in one process: start it without torchrun"):
        run_lr_find(compose_config(TINY), tmp_path / "run")
    assert not (tmp_path / "run").exists()


class _Started(Exception):
    """Raised once the starting weights are captured: nothing more needs to run."""


@pytest.mark.parametrize("source", ["model.weights", "init_from"])
def test_starts_from_the_weights_training_would_start_the_stage_from(source, tmp_path, monkeypatch):
    """stage=high from a saved state dict: the weights lr_find sweeps from are the weights a training run's
    stage 'high' opens with (train.open_stage), tensor for tensor, BatchNorm statistics included."""
    from cbam_train.models import build_model
    from cbam_train.training import train

    torch.manual_seed(123)  # not the run's seed: the file's tensors differ from the run's own random init
    saved = build_model(compose_config(TINY).model).state_dict()
    for v in saved.values():
        if v.is_floating_point():
            v.add_(0.01)  # BatchNorm statistics and CBAM's zero-initialised layers differ from an init too
    torch.save(saved, tmp_path / "w.pt")
    overrides = TINY + ["stage=high", f"{source}={tmp_path / 'w.pt'}"]
    captured = {}

    def at_sweep(model, *rest):
        captured["lr_find"] = state_copy(model)
        raise _Started

    def at_open_stage(run, stage):
        captured["train"] = state_copy(run.model)
        raise _Started

    monkeypatch.setattr(ranges, "range_test", at_sweep)
    monkeypatch.setattr(train, "open_stage", at_open_stage)
    for name, task, task_overrides in (("lr_find", run_lr_find, []), ("train", train.run, ["task=train"])):
        with pytest.raises(_Started):
            task(compose_config(overrides + task_overrides), tmp_path / name)
    assert_same_state(captured["lr_find"], captured["train"])
    assert_same_state(captured["lr_find"], saved)  # the file's tensors, not the run's own random init


@pytest.mark.parametrize("override, message", [
    ("lr_find.min_lr=0", "lr_find.min_lr must be > 0, got 0.0"),
    ("lr_find.max_lr=1e-8", "lr_find.max_lr must be > lr_find.min_lr (1e-07), got 1e-08"),
    ("lr_find.steps=5", "lr_find.steps must be >= 10, got 5"),
    ("lr_find.smooth=1", "lr_find.smooth must be in [0, 1), got 1.0"),
    ("lr_find.diverge_factor=1", "lr_find.diverge_factor must be > 1"),
    ("lr_find.max_lr=inf", "lr_find.max_lr must be a finite number, got inf"),
])
def test_bad_keys_are_refused_with_one_line(override, message, tmp_path, monkeypatch, capsys):
    from cbam_train.cli import command

    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["cbam-train", *TINY, override, f"hydra.run.dir={run}"])
    with pytest.raises(SystemExit) as e:
        command.main()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not run.exists() or not any(run.iterdir())  # refused before anything is written


def test_lr_find_keys_change_nothing_a_resume_continues():
    """A checkpoint saved before the lr_find group existed (or with other lr_find.* values) resumes without a
    warning: the sweep's settings change no number of a training run."""
    from cbam_train.state.resume import resume_changes

    assert resume_changes({"lr": 1e-3}, {"lr": 1e-3, "lr_find": {"min_lr": 1e-7, "steps": 100}}) == ([], [])


def test_the_sweep_accumulates_and_clips_as_training_steps():
    """train.accumulate_steps=3: each lr's step takes 3 batches and its loss is their mean; train.grad_clip_norm:
    plain SGD moves the weights by at most lr_i x the limit per step, so by sum(lr_i) x limit over the sweep."""
    from torch import nn

    from cbam_train.training.range_test import SweepSetup, range_test

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    data = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(30)]
    drawn = []

    def batches():
        for i, batch in enumerate(data):
            drawn.append(i)
            yield batch

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = []
    opt.register_step_pre_hook(lambda o, args, kwargs: steps.append(o.param_groups[0]["lr"]))
    lrs = lr_schedule(1e-2, 1.0, 10)
    setup = SweepSetup(torch.device("cpu"), smooth=0.0, diverge_factor=1e9, accumulate_steps=3, grad_clip_norm=1e-3)
    result = range_test(model, batches(), opt, lrs, setup)
    assert len(drawn) == 30 and steps == pytest.approx(lrs) and len(result.losses) == 10
    moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm().item()
    assert 0 < moved <= sum(lrs) * 1e-3 * (1 + 1e-6)
