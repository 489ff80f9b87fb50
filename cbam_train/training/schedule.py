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

from cbam_train.config.errors import ConfigError
from cbam_train.config.schema import PlateauConfig


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based position in the schedule
    name: str
    epochs: int
    lr: Optional[float]  # None: found by a range test at the stage's start (auto_run.settle_lr)
    trainable: tuple
    first_epoch: int  # global 1-based epoch at which this stage starts in the full schedule
    sched: str = "constant"  # lr within the stage: constant | cosine | step
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine
    step_size: int = 10  # step: epochs between lr drops
    gamma: float = 0.1  # step: lr multiplier at each drop
    lr_mult: tuple = ()  # ((module path, multiplier of lr), ...)
    layer_decay: Optional[float] = None  # lr x decay**depth (DEPTH): fc 0, layer4 1, ..., stem 5
    plateau: Optional[PlateauConfig] = None  # until_plateau: `epochs` is then a maximum

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
    """The stages that run, in order. `lr` sets the first running stage's lr; later ones keep their ratio (a stage
    with lr null keeps finding its own; after a first one with lr null, they keep theirs)."""
    names = list(stages)
    chosen = select_stages(names, str(select))
    first_lr = stages[names[chosen[0]]].lr
    scale = 1.0 if lr is None or first_lr is None else lr / first_lr
    first_epoch = {}
    total = 0
    for n in names:
        first_epoch[n] = total + 1
        total += stages[n].epochs
    out = []
    for i in chosen:
        stage_cfg = stages[names[i]]
        sched = getattr(stage_cfg, "sched", None)
        stage_lr = stage_cfg.lr * scale if stage_cfg.lr is not None else (lr if i == chosen[0] else None)
        out.append(Stage(index=i + 1, name=names[i], epochs=stage_cfg.epochs, lr=stage_lr,
                         trainable=tuple(stage_cfg.trainable),
                         first_epoch=first_epoch[names[i]], sched=sched.name if sched else "constant",
                         warmup_epochs=sched.warmup_epochs if sched else 0.0,
                         min_lr_ratio=sched.min_lr_ratio if sched else 0.0,
                         step_size=sched.step_size if sched else 10, gamma=sched.gamma if sched else 0.1,
                         lr_mult=tuple((getattr(stage_cfg, "lr_mult", None) or {}).items()),
                         layer_decay=getattr(stage_cfg, "layer_decay", None),
                         plateau=_plateau(getattr(stage_cfg, "until_plateau", None))))
    return out


# Depth below the head, for layer_decay: fc 0, layer4 1, ..., layer1 4, the stem (conv1, bn1) 5.
DEPTH = {"fc": 0, "layer4": 1, "layer3": 2, "layer2": 3, "layer1": 4}
STEM_DEPTH = 5
DEEPER_PATHS = "deeper paths work too, e.g. layer4.1, layer3.0.conv1 or cbam.layer4"


def depth_of(param: str) -> int:
    """A parameter's layer_decay depth; a CBAM module takes the depth of the layer it sits after (cbam.layerK)
    or in (layerK.i.cbam)."""
    parts = param.split(".")
    top = parts[1] if parts[0] == "cbam" and len(parts) > 1 else parts[0]
    return DEPTH.get(top, STEM_DEPTH)


def _specificity(entry: str) -> tuple:
    """Which of several matching lr_mult entries wins: the deeper path; 'cbam' beats a top-level name."""
    return (entry.count(".") + 1, entry == "cbam")


def lr_multiplier(param: str, stage: Stage) -> float:
    """The stage's lr multiplier for one parameter: its most specific lr_mult entry (1.0 if none), times
    layer_decay ** depth when layer_decay is set."""
    matches = [(entry, mult) for entry, mult in stage.lr_mult if _selects(entry, param)]
    mult = max(matches, key=lambda m: _specificity(m[0]))[1] if matches else 1.0
    return mult * (stage.layer_decay ** depth_of(param) if stage.layer_decay is not None else 1.0)


def _owner(param: str, stage: Stage) -> str:
    """The name a parameter's param group lists it under: its lr_mult entry, else cbam.layerK or its top module."""
    matches = [entry for entry, _ in stage.lr_mult if _selects(entry, param)]
    if matches:
        return max(matches, key=_specificity)
    parts = param.split(".")
    return ".".join(parts[:2]) if parts[0] == "cbam" else parts[0]


def param_groups(model: nn.Module, stage: Stage) -> list:
    """The stage's trainable parameters as optimizer param groups, one per distinct lr, in model order:
    {"params", "lr", "lr_mult", "modules"} ("modules": the names the stage table shows)."""
    trainable = set(trainable_parameters(model, stage.trainable))
    groups: dict = {}
    for name, p in model.named_parameters():
        if name not in trainable:
            continue
        mult = lr_multiplier(name, stage)
        lr = stage.lr * mult if stage.lr is not None else None  # None: not found yet
        group = groups.setdefault(mult, {"params": [], "lr": lr, "lr_mult": mult, "modules": []})
        group["params"].append(p)
        owner = _owner(name, stage)
        if owner not in group["modules"]:
            group["modules"].append(owner)
    out = list(groups.values())
    for group in out:  # every stage-placed CBAM in one group: listed as "cbam"
        cbams = [m for m in group["modules"] if m.startswith("cbam.")]
        if len(cbams) > 1 and not any(m.startswith("cbam.") for g in out if g is not group for m in g["modules"]):
            group["modules"] = [m for m in group["modules"] if m not in cbams[1:]]
            group["modules"][group["modules"].index(cbams[0])] = "cbam"
    return out


def _plateau(cfg: Optional[PlateauConfig]) -> Optional[PlateauConfig]:
    """until_plateau when it is on (a patience is set), else None."""
    return cfg if cfg is not None and cfg.patience is not None else None


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
            raise ConfigError(f"schedule.stages.{stage_name}.trainable: unknown module {entry!r}; known: {known}; "
                              f"{DEEPER_PATHS}")
        trained = trainable_parameters(model, stage_cfg.trainable)
        if not trained:
            raise ConfigError(f"schedule.stages.{stage_name}.trainable={list(stage_cfg.trainable)} selects no "
                              f"parameters of this model (model.cbam.enabled=false?); known: {known}")
        for entry in getattr(stage_cfg, "lr_mult", None) or {}:
            key = f"schedule.stages.{stage_name}.lr_mult.{entry}"
            if not any(_selects(entry, p) for p in params):
                raise ConfigError(f"{key}: unknown module {entry!r}; known: {known}; {DEEPER_PATHS}")
            if not any(_selects(entry, p) for p in trained):
                raise ConfigError(f"{key}: {entry} does not train in this stage "
                                  f"(trainable: {', '.join(stage_cfg.trainable)}); add it there or drop the entry")


def trainable_parameters(model: nn.Module, trainable: Iterable[str]) -> list:
    """Names of the parameters a stage trains, in model order."""
    entries = list(trainable)
    return [n for n, _ in model.named_parameters() if any(_selects(e, n) for e in entries)]


def apply_stage(model: nn.Module, trainable: Iterable[str], freeze_bn: bool = True) -> list:
    """Set requires_grad for a stage and return its trainable parameters.

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
        # nn.Module types attribute assignment as Tensor | Module; freeze_bn is ResNetCBAM's plain bool
        model.freeze_bn = freeze_bn  # type: ignore[assignment]
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
