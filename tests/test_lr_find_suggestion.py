"""Does task=lr_find's suggestion help? Training the swept stage at the suggested lr against 100x and 1/100 of it,
with training's own loop: the suggestion must reach a clearly lower loss than both."""

from __future__ import annotations

import math

import pytest
from conftest import NARROW, compose_config

from cbam_train.tasks.lr_find import run_lr_find


class _Take:
    """The next n batches of an endless stream, as a loader train_one_epoch can take (it asks for len)."""

    def __init__(self, batches, n: int) -> None:
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (next(self.batches) for _ in range(self.n))


def train_loss_at(cfg, lr: float, steps: int, run_dir) -> float:
    """Train the swept stage from its starting weights at a constant lr for `steps` batches, with training's own
    loop (engine.train_one_epoch): the mean training loss of the last 10 (inf if it stopped on a non-finite one)."""
    import dataclasses

    from cbam_train.config.errors import NonFiniteLoss
    from cbam_train.training.device import setup_device
    from cbam_train.training.engine import EpochSetup, train_one_epoch
    from cbam_train.training.range_test import endless
    from cbam_train.training.session import build_stage
    from cbam_train.training.startup import load_weights, prepare_data, start_run

    started = start_run(cfg, run_dir, None, required=("lr_find.json",))
    try:
        _, loaders = prepare_data(cfg, started.device, started.rep)
        model, stage = started.model, dataclasses.replace(started.stages[0], lr=lr)
        load_weights(cfg, model, [stage], started.rep)
        amp = setup_device(model, cfg.device, started.device)
        parts = build_stage(model, stage, cfg)  # the stage as training opens it, at this lr
        batches, setup = endless(loaders.train), EpochSetup(started.device, amp)
        try:
            train_one_epoch(parts.step_model, _Take(batches, steps - 10), parts.optimizer, setup)
            return train_one_epoch(parts.step_model, _Take(batches, 10), parts.optimizer, setup).loss
        except NonFiniteLoss:
            return math.inf
    finally:
        started.rep.close()


# The smoke preset's first stage (every parameter trains, from random weights, Adam) on 8x8 synthetic images: 512
# training images in batches of 32, a 60-step sweep, then 40 steps of training at a constant lr, scored by the mean
# training loss of the last 10. Measured on this 2-core CPU (2026-12-02), suggestion / 100x / 1/100:
#   seed 0: lr 3.6e-4: 1.35/2.28/2.44    seed 1: lr 1.4e-3: 1.20/2.31/2.46    seed 2: lr 1.1e-3: 1.11/2.30/2.42
# Other seeds change the data, the initial weights and the batch order, a far larger change than another CPU's
# rounding, and the smallest margin is 0.93; the test asks for 0.3. Why it holds: the steepest descent lies at or
# below the best lr (~1e-3 here), 1/100 of it barely moves the weights in 40 steps (the loss stays near its start,
# ~2.4), and 100x of it (3.6e-2 to 0.14) is past where Adam trains this network from scratch (chance level, 2.30).
FALSIFY = ["experiment=smoke", NARROW, "task=lr_find", "data.image_size=8", "data.train_size=528", "data.val_size=16",
           "data.test_size=16", "data.batch_size=32", "lr_find.steps=60", "log.mode=quiet"]


@pytest.mark.slow
def test_the_suggestion_trains_better_than_100x_or_a_hundredth_of_it(tmp_path):
    cfg = compose_config(FALSIFY)
    lr = run_lr_find(cfg, tmp_path / "find")["suggestion"]["lr"]
    loss = {factor: train_loss_at(cfg, lr * factor, 40, tmp_path / f"x{factor}") for factor in (1, 100, 0.01)}
    assert loss[1] < loss[100] - 0.3 and loss[1] < loss[0.01] - 0.3, (lr, loss)
