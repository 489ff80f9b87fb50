"""The staged unfreezing schedule as pure functions of the config and the model's parameter names.

Which parameters train in stage k, and at what learning rate, is decided here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from cbam_train.config import ConfigError

SPECIAL = ("all", "cbam")  # all: every parameter; cbam: every CBAM module wherever it is placed


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based position in the schedule
    name: str
    epochs: int
    lr: float
    trainable: tuple
    first_epoch: int  # global 1-based epoch at which this stage starts in the full schedule
    sched: str = "constant"  # lr within the stage: constant | cosine | step
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine
    step_size: int = 10  # step: epochs between lr drops
    gamma: float = 0.1  # step: lr multiplier at each drop

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1

    def has_lr_schedule(self) -> bool:
        return self.sched != "constant" or self.warmup_epochs > 0


def lr_factor(step: int, stage: Stage, steps_per_epoch: int) -> float:
    """The lr multiplier for 0-based optimizer step `step` of a stage: linear warm-up over its first
    warmup_epochs (1/w, 2/w, ..., 1 per step), then constant, a half cosine down to min_lr_ratio at the
    stage's last step, or gamma ** (epoch // step_size) with `epoch` counted from the stage's start: torch's
    StepLR stepped once per epoch."""
    steps, warmup = stage.epochs * steps_per_epoch, round(stage.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if stage.sched == "cosine":
        t = min(1.0, (step - warmup) / max(1, steps - warmup - 1))
        return stage.min_lr_ratio + (1.0 - stage.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if stage.sched == "step":
        return stage.gamma ** ((step // steps_per_epoch) // stage.step_size)
    return 1.0


def select_stages(names: Sequence[str], select: str) -> list:
    """Indices (0-based) of the stages that `stage=<select>` runs: all, a 1-based number or a name."""
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(names, 1))
    if select == "all":
        return list(range(len(names)))
    if select.isdigit():
        k = int(select)
        if not 1 <= k <= len(names):
            raise ConfigError(f"stage={select}: out of range; the schedule has {len(names)} stages: {listing}")
        return [k - 1]
    if select in names:
        return [list(names).index(select)]
    raise ConfigError(f"stage={select}: unknown stage; use all, a number or a name: {listing}")


def resolve_stages(stages: Mapping, select: str = "all", lr: Optional[float] = None) -> list:
    """The stages that run, in order. `lr` sets the first running stage's lr; later ones keep their ratio."""
    names = list(stages)
    chosen = select_stages(names, str(select))
    scale = 1.0 if lr is None else lr / stages[names[chosen[0]]].lr
    first_epoch = {}
    total = 0
    for n in names:
        first_epoch[n] = total + 1
        total += stages[n].epochs
    out = []
    for i in chosen:
        stage_cfg = stages[names[i]]
        sched = getattr(stage_cfg, "sched", None)
        out.append(Stage(index=i + 1, name=names[i], epochs=stage_cfg.epochs, lr=stage_cfg.lr * scale,
                         trainable=tuple(stage_cfg.trainable),
                         first_epoch=first_epoch[names[i]], sched=sched.name if sched else "constant",
                         warmup_epochs=sched.warmup_epochs if sched else 0.0,
                         min_lr_ratio=sched.min_lr_ratio if sched else 0.0,
                         step_size=sched.step_size if sched else 10, gamma=sched.gamma if sched else 0.1))
    return out


def module_names(model: nn.Module) -> list:
    """Top-level modules that own parameters, in model order (conv1, bn1, layer1..layer4, fc, cbam)."""
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


def _selects(entry: str, param: str) -> bool:
    """Whether a trainable entry ('all', 'cbam', a module like 'layer4') selects the parameter named `param`."""
    if entry == "all":
        return True
    if entry == "cbam":
        return "cbam" in param.split(".")
    return param == entry or param.startswith(entry + ".")


def check_trainable(model: nn.Module, stages: Mapping) -> None:
    """Fail at start-up, naming the stage and the valid names, if a trainable entry matches nothing."""
    params = [n for n, _ in model.named_parameters()]
    has_cbam = any(_selects("cbam", p) for p in params)
    known = ", ".join([n for n in module_names(model) if n != "cbam"] + ["all"] + (["cbam"] if has_cbam else []))
    for stage_name, stage_cfg in stages.items():
        for entry in stage_cfg.trainable:
            if entry == "all" or (entry == "cbam" and has_cbam) or any(_selects(entry, p) for p in params):
                continue
            if entry == "cbam":  # the seed schedule names cbam; with CBAM off it simply selects nothing
                continue
            raise ConfigError(f"schedule.stages.{stage_name}.trainable: unknown module {entry!r}; known: {known}")
        if not trainable_parameters(model, stage_cfg.trainable):
            raise ConfigError(f"schedule.stages.{stage_name}.trainable={list(stage_cfg.trainable)} selects no "
                              f"parameters of this model (model.cbam.enabled=false?); known: {known}")


def trainable_parameters(model: nn.Module, trainable: Iterable[str]) -> list:
    """Names of the parameters a stage trains, in model order."""
    entries = list(trainable)
    return [n for n, _ in model.named_parameters() if any(_selects(e, n) for e in entries)]


def apply_stage(model: nn.Module, trainable: Iterable[str], freeze_bn: bool = True) -> list:
    """Set requires_grad for a stage and return its trainable parameters (for the optimizer).

    With freeze_bn, BatchNorm layers whose parameters are all frozen stay in eval mode whenever the
    model is put in train mode (see ResNetCBAM.train), so their running statistics stop changing too.
    """
    names = set(trainable_parameters(model, trainable))
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    if hasattr(model, "freeze_bn"):
        model.freeze_bn = freeze_bn
    model.train(model.training)  # re-apply the BN modes for the new trainable set
    return params


def frozen_new_modules(stages: Sequence[Stage], new_modules: Iterable[str], model: nn.Module) -> dict:
    """Newly initialised (not loaded) modules that a stage keeps frozen before any stage has trained
    them, i.e. still at their random init: {stage name: [module]}."""
    out = {}
    untrained = list(new_modules)
    for stage in stages:
        trained = trainable_parameters(model, stage.trainable)
        untrained = [m for m in untrained if not any(_selects(m, p) for p in trained)]
        if untrained:
            out[stage.name] = list(untrained)
    return out


def stage_scheduler(opt: torch.optim.Optimizer, stage: Stage, steps_per_epoch: int) -> Optional[LambdaLR]:
    """The per-step lr schedule inside a stage (schedule.stages.<name>.sched), or None for a constant lr."""
    if not stage.has_lr_schedule():
        return None
    return LambdaLR(opt, lambda k: lr_factor(k, stage, steps_per_epoch))
