"""Gradient accumulation (train.accumulate_steps) and clipping (train.grad_clip_norm): what the optimizer
steps on, what the lr schedule counts, where checkpoints and stops may fall, and what clipping bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import NARROW, PICTURES_OFF, compose_config
from torch import nn

from cbam_train.config.errors import ConfigError
from cbam_train.training.device import Amp
from cbam_train.training.engine import (
    EpochSetup,
    micro_batch_share,
    optimizer_step,
    optimizer_steps_per_epoch,
    train_one_epoch,
)

# 200 images, 32 held out: 168 train. At batch 32, 5 full batches and one of 8; at batch 16, 10 full and one of
# 8, i.e. 5 groups of 2 and a last group of 1 -- which must average over its 8 images alone, as the 32-run's
# last batch does.
BASE = ["experiment=smoke", NARROW, "data.image_size=8", "data.train_size=200", "data.val_size=32", "data.test_size=32",
        "augment=none", "log.mode=quiet", "stage=head", "schedule.stages.head.epochs=2",
        "schedule.stages.head.trainable=[fc,cbam,layer4.1.conv2]", "optim=sgd", "lr=0.05",
        "schedule.stages.head.sched.name=cosine", "schedule.stages.head.sched.warmup_epochs=0.5", *PICTURES_OFF]


def rows(run_dir: Path) -> list:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_groups_and_optimizer_steps_per_epoch():
    assert [micro_batch_share(s, 13, 2) for s in range(1, 14)] == [2] * 12 + [1]
    assert [micro_batch_share(s, 7, 3) for s in range(1, 8)] == [3, 3, 3, 3, 3, 3, 1]
    assert [micro_batch_share(s, 5, 1) for s in range(1, 6)] == [1] * 5
    assert [optimizer_steps_per_epoch(n, k) for n, k in ((13, 2), (12, 2), (7, 3), (5, 1), (2, 8))] == [7, 6, 3, 5, 1]


@pytest.mark.parametrize("override, message", [
    ("train.accumulate_steps=0", r"train.accumulate_steps must be >= 1, got 0"),
    ("train.grad_clip_norm=0", r"train.grad_clip_norm must be > 0, got 0"),
    ("train.grad_clip_norm=nan", r"train.grad_clip_norm must be a finite number"),
    ("train.grad_clip_norm=-inf", r"train.grad_clip_norm must be a finite number"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([override, "data.root=/x"])


def test_checkpoints_and_skip_batch_must_fit_the_accumulation():
    with pytest.raises(ConfigError, match=r"checkpoint_every_n_steps=3 must be a multiple of train.accumulate_steps=2"):
        compose_config(["train.accumulate_steps=2", "train.checkpoint_every_n_steps=3", "data.root=/x"])
    with pytest.raises(ConfigError, match=r"nan_policy=skip_batch does not combine with train.accumulate_steps > 1"):
        compose_config(["train.accumulate_steps=2", "train.nan_policy=skip_batch", "data.root=/x"])
    compose_config(["train.accumulate_steps=2", "train.checkpoint_every_n_steps=4", "data.root=/x"])  # fine


def _tiny_setup(**kw) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    data = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(7)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, data, opt, EpochSetup(torch.device("cpu"), **kw)


def test_a_stop_request_waits_for_the_end_of_the_optimizer_step():
    """Asked to stop after every batch, with 3 batches per step the epoch stops after batch 3, its first
    optimizer step, with no half-accumulated gradients left behind; checkpoints likewise only at step ends."""
    model, data, opt, setup = _tiny_setup(accumulate_steps=3, should_stop=lambda: True)
    result = train_one_epoch(model, data, opt, setup)
    assert result.stopped and result.state.step == 3
    assert all(p.grad is None for p in model.parameters())
    taken = []
    model, data, opt, setup = _tiny_setup(accumulate_steps=3, checkpoint_every=3,
                                          on_checkpoint=lambda state: taken.append(state.step))
    train_one_epoch(model, data, opt, setup)
    assert taken == [3, 6]  # never after batch 7, the epoch's end (the epoch-end checkpoint takes over)


def test_accumulated_steps_equal_the_large_batch_ones():
    """Batches of 4 accumulated 3 at a time (and a last group of 1) step the weights as batches of 12 (and a
    last batch of 4) do: the loss is a mean, so the mean of 3 equal-sized means is the mean over 12. The two
    sum in another order, so they agree to float64 rounding (~1e-16 relative per op), not bit for bit."""
    torch.set_default_dtype(torch.float64)
    try:
        model_a, _, opt_a, setup_a = _tiny_setup(accumulate_steps=3)
        model_b, _, opt_b, setup_b = _tiny_setup()
        g = torch.Generator().manual_seed(1)
        xs, ys = torch.randn(28, 3, 2, 2, generator=g), torch.randint(0, 3, (28,), generator=g)
        small = [(xs[i:i + 4], ys[i:i + 4]) for i in range(0, 28, 4)]  # 7 batches: groups 3, 3, 1
        large = [(xs[:12], ys[:12]), (xs[12:24], ys[12:24]), (xs[24:], ys[24:])]
        train_one_epoch(model_a, small, opt_a, setup_a)
        train_one_epoch(model_b, large, opt_b, setup_b)
        for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert (pa - pb).abs().max().item() <= 1e-12
        fresh = _tiny_setup()[0].parameters()
        moved = max((p - q).abs().max().item() for p, q in zip(model_a.parameters(), fresh, strict=True))
        assert moved > 1e-3  # the steps did move the weights, far beyond the tolerance
    finally:
        torch.set_default_dtype(torch.float32)


def test_clipping_unscales_fp16_gradients_first():
    """With a GradScaler the clip must see the true gradient norm: the returned (pre-clip) norm equals the
    unscaled one, and the step applied is the clipped true gradient."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    loss = (w * torch.tensor([3.0, 4.0])).sum()  # gradient (3, 4): norm 5
    scaler.scale(loss).backward()
    norm = optimizer_step(opt, Amp(scaler=scaler), clip_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert w.detach().tolist() == pytest.approx([3.0 - 0.6, 4.0 - 0.8])  # a step of the clipped (0.6, 0.8)


@pytest.mark.slow
def test_two_times_16_accumulated_equals_32_through_the_cli(tmp_path):
    """The whole run in float64 (conftest.default_dtype), BatchNorm frozen (only fc, CBAM and one conv train,
    freeze_bn keeps every BatchNorm in eval mode), no augmentation: batch 16 x 2 accumulated must train as
    batch 32, with the cosine schedule counting optimizer steps (5 + 1 per epoch in both; counting batches
    would stretch the warm-up and the cosine twofold and move the weights by a share of their update).
    Tolerance as in test_distributed: float64 rounding amplified by a few dozen steps stays ~1e-14."""
    from test_distributed import float64_weights_match, single

    one = single(BASE + ["data.batch_size=32", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, float64=True)
    two = single(BASE + ["data.batch_size=16", "train.accumulate_steps=2", f"hydra.run.dir={tmp_path / 'two'}"],
                 tmp_path, float64=True)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=False):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
        assert ra["train_acc"] == rb["train_acc"] and ra["val_acc"] == rb["val_acc"]
    float64_weights_match(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_clipping_bounds_every_step_and_a_loose_limit_changes_nothing(tmp_path):
    """Plain SGD (no momentum, no weight decay) moves the weights by lr x the clipped gradient per step, so
    with limit c the total move over n steps is at most n x lr x c (triangle inequality); a limit no
    gradient reaches multiplies by exactly 1.0, so the run is bit-identical to an unclipped one."""
    from cbam_train.models import build_model
    from cbam_train.training.schedule import trainable_parameters
    from cbam_train.training.train import run

    torch.manual_seed(0)
    start = build_model(compose_config(BASE).model).state_dict()
    torch.save(start, tmp_path / "start.pt")  # every run starts from exactly these weights
    args = BASE + ["data.batch_size=32", "optim.momentum=0", "optim.nesterov=false", "optim.weight_decay=0",
                   "schedule.stages.head.sched.name=constant", "schedule.stages.head.sched.warmup_epochs=0",
                   f"init_from={tmp_path / 'start.pt'}"]
    run(compose_config(args), tmp_path / "plain")
    run(compose_config(args + ["train.grad_clip_norm=1e9"]), tmp_path / "loose")
    run(compose_config(args + ["train.grad_clip_norm=1e-3"]), tmp_path / "tight")
    plain, loose, tight = (torch.load(tmp_path / d / "model.pt", weights_only=True)
                           for d in ("plain", "loose", "tight"))
    assert all(torch.equal(plain[k], loose[k]) for k in plain)
    assert [r["clipped_steps"] for r in rows(tmp_path / "loose")] == [0, 0]
    assert [r["clipped_steps"] for r in rows(tmp_path / "tight")] == [6, 6]  # every step's norm is over 1e-3
    assert "clipped_steps" not in rows(tmp_path / "plain")[0]
    names = trainable_parameters(build_model(compose_config(args).model), ["fc", "cbam", "layer4.1.conv2"])
    moved = torch.cat([(tight[n] - start[n]).flatten() for n in names]).norm().item()
    unclipped = torch.cat([(plain[n] - start[n]).flatten() for n in names]).norm().item()
    assert moved <= 12 * 0.05 * 1e-3 * (1 + 1e-5) < unclipped  # 2 epochs x 6 steps, lr 0.05, limit 1e-3
