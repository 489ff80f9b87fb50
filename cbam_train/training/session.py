"""The objects of a training run once it is set up (Run), and of one stage (StageSession: optimizer, lr
schedule, the DDP wrapper and compiled model the steps call), opened by open_stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from cbam_train.config.schema import Config
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.checkpointer import Checkpointer
from cbam_train.state.run_state import RunState
from cbam_train.training import distributed
from cbam_train.training.device import Amp, compile_for_stage
from cbam_train.training.distributed import Dist
from cbam_train.training.engine import EpochSetup, optimizer_steps_per_epoch
from cbam_train.training.optim import build_optimizer
from cbam_train.training.schedule import Stage, apply_stage, param_groups, stage_scheduler
from cbam_train.training.stopper import Stopper


@dataclass
class Run:
    """Everything one training run works with, built once by train.set_up_run."""

    cfg: Config
    run_dir: Path
    dist: Dist
    device: torch.device
    rep: Reporter
    stages: list  # schedule.Stage, in order
    stage_rows: list  # startup.stage_table_rows: the stage table and summary.json's "stages"
    model: nn.Module
    amp: Amp
    ema: Optional[torch.optim.swa_utils.AveragedModel]  # evaluated and saved instead of the raw weights when on
    splits: Any  # data.Splits
    loaders: Any  # loaders.Loaders
    state: RunState
    checkpointer: Checkpointer
    stopper: Stopper
    resumed_from: Optional[Path] = None  # the checkpoint file resumed from
    attention: Optional[Any] = None  # stage_report.StageAttention (log.attention_report, rank 0), else None

    @property
    def eval_model(self) -> nn.Module:
        """The weights val/test accuracy and model.pt refer to: the EMA's when train.ema_decay is set."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class StageSession:
    """One stage's training objects; `setup` is how its epochs run (train_one_epoch's EpochSetup)."""

    stage: Stage
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    model: nn.Module  # what the steps call: the model, DDP-wrapped and/or compiled for this stage's parameters
    setup: EpochSetup


def open_stage(run: Run, stage: Stage) -> StageSession:
    """Unfreeze the stage's modules; a fresh optimizer and lr schedule over them (a resumed stage's state put
    back); a new DDP wrapper and compiled graph, which both fix the trainable parameters when they are built."""
    cfg = run.cfg
    apply_stage(run.model, stage.trainable, cfg.schedule.freeze_bn)
    optimizer = build_optimizer(param_groups(run.model, stage), cfg.optim, stage.lr)
    scheduler = stage_scheduler(optimizer, stage,
                                optimizer_steps_per_epoch(len(run.loaders.train), cfg.train.accumulate_steps))
    run.state.restore_stage(stage.name, optimizer, scheduler, str(run.resumed_from))
    step_model = distributed.wrap(run.model, run.dist, run.device)
    step_model = compile_for_stage(step_model, cfg.device) if cfg.device.compile else step_model
    setup = EpochSetup(run.device, run.amp, every_n_steps=cfg.log.every_n_steps, nan_policy=cfg.train.nan_policy,
                       label_smoothing=cfg.train.label_smoothing, scheduler=scheduler, ema=run.ema,
                       should_stop=run.stopper.after_step, checkpoint_every=cfg.train.checkpoint_every_n_steps,
                       any_rank=run.stopper.any_rank, accumulate_steps=cfg.train.accumulate_steps,
                       grad_clip_norm=cfg.train.grad_clip_norm, mix=run.loaders.mix)
    length = f"{stage.epochs} epoch(s)" if stage.plateau is None else (
        f"up to {stage.epochs} epoch(s), until {stage.plateau.metric} plateaus (patience {stage.plateau.patience})")
    run.rep.banner(f"stage {stage.index}/{len(cfg.schedule.stages)} '{stage.name}': {length}, "
                   f"lr {stage.lr:.2e}, training {', '.join(stage.trainable)}")
    return StageSession(stage, optimizer, scheduler, step_model, setup)
