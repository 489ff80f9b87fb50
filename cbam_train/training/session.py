"""The objects of a training run once it is set up (Run), and of one stage: `build_stage` (unfreeze, param
groups, optimizer, the DDP wrapper and compiled model the steps call), the one builder that training,
task=bench and task=lr_find share, and `open_stage` (training's StageSession: that plus the lr schedule, a
resumed stage's state and how its epochs run)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from cbam_train.config.schema import Config
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.run_state import RunState
from cbam_train.training import distributed
from cbam_train.training.checkpointer import Checkpointer
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
    attention: Optional[Any] = None  # explain_report.StageAttention (log.attention_report, rank 0), else None

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


@dataclass
class StageParts:
    """What a stage's steps work with, as `build_stage` makes it."""

    groups: list  # schedule.param_groups: the optimizer's groups, each with its lr_mult and modules
    optimizer: torch.optim.Optimizer
    step_model: nn.Module  # what the steps call: the model, DDP-wrapped and/or compiled for the stage's parameters


def build_stage(model: nn.Module, stage: Stage, cfg: Config, dist: Dist = Dist(),
                device: Optional[torch.device] = None) -> StageParts:
    """Unfreeze the stage's modules; an optimizer over its param groups (each lr = stage lr x lr_mult); a new
    DDP wrapper (data-parallel runs) and compiled graph (device.compile), both built after the unfreeze since
    they fix the trainable parameters when they are built. A stage whose lr is still to be found (lr: null; bench,
    lr_find, its range test) steps at lr_find.min_lr until someone sets it."""
    lr = stage.lr if stage.lr is not None else cfg.lr_find.min_lr
    stage = dataclasses.replace(stage, lr=lr)
    apply_stage(model, stage.trainable, cfg.schedule.freeze_bn)
    groups = param_groups(model, stage)
    optimizer = build_optimizer(groups, cfg.optim, lr)
    step_model = distributed.wrap(model, dist, device) if device is not None else model
    step_model = compile_for_stage(step_model, cfg.device) if cfg.device.compile else step_model
    return StageParts(groups, optimizer, step_model)


def open_stage(run: Run, stage: Stage) -> StageSession:
    """The stage's parts (`build_stage`), its lr schedule, a resumed stage's optimizer and schedule state put
    back, how its epochs run; the stage's banner."""
    cfg = run.cfg
    parts = build_stage(run.model, stage, cfg, run.dist, run.device)
    scheduler = stage_scheduler(parts.optimizer, stage,
                                optimizer_steps_per_epoch(len(run.loaders.train), cfg.train.accumulate_steps))
    run.state.restore_stage(stage.name, parts.optimizer, scheduler, str(run.resumed_from))
    setup = EpochSetup(run.device, run.amp, every_n_steps=cfg.log.every_n_steps, nan_policy=cfg.train.nan_policy,
                       label_smoothing=cfg.train.label_smoothing, scheduler=scheduler, ema=run.ema,
                       should_stop=run.stopper.after_step, checkpoint_every=cfg.train.checkpoint_every_n_steps,
                       any_rank=run.stopper.any_rank, accumulate_steps=cfg.train.accumulate_steps,
                       grad_clip_norm=cfg.train.grad_clip_norm, mix=run.loaders.mix)
    length = f"{stage.epochs} epoch(s)" if stage.plateau is None else (
        f"up to {stage.epochs} epoch(s), until {stage.plateau.metric} plateaus (patience {stage.plateau.patience})")
    run.rep.banner(f"stage {stage.index}/{len(cfg.schedule.stages)} '{stage.name}': {length}, "
                   f"lr {stage.lr:.2e}, training {', '.join(stage.trainable)}")
    return StageSession(stage, parts.optimizer, scheduler, parts.step_model, setup)
