"""check_schedule(): schedule.stages (each stage's epochs, lr, trainable set, lr schedule, plateau) and
schedule.auto (schedule=auto: the plan's keys and what it decides itself). Part of validate()."""

from __future__ import annotations

from typing import Optional

from cbam_train.config.checks import choice, in_range, positive
from cbam_train.config.errors import ConfigError
from cbam_train.config.schema import Config


def check_schedule(cfg: Config) -> None:
    if cfg.schedule.auto.enabled:
        _check_auto(cfg)
        return
    if not cfg.schedule.stages:
        raise ConfigError("schedule.stages is empty: define at least one stage (see conf/schedule/seed.yaml), or "
                          "let the network plan them: schedule=auto")
    for name, stage in cfg.schedule.stages.items():
        key = f"schedule.stages.{name}"
        if stage.epochs < 1:
            raise ConfigError(f"{key}.epochs must be >= 1, got {stage.epochs}")
        if stage.lr is not None:  # null: found by a range test at the stage's start
            positive(f"{key}.lr", stage.lr)
        if not stage.trainable:
            raise ConfigError(f"{key}.trainable is empty: list modules to train, or [all]")
        choice(f"{key}.sched.name", stage.sched.name, ("constant", "cosine", "step"))
        positive(f"{key}.sched.warmup_epochs", stage.sched.warmup_epochs, strict=False)
        if stage.sched.warmup_epochs > stage.epochs:
            raise ConfigError(f"{key}.sched.warmup_epochs={stage.sched.warmup_epochs} is longer than the stage "
                              f"({stage.epochs} epochs)")
        in_range(f"{key}.sched.min_lr_ratio", stage.sched.min_lr_ratio, 0.0, 1.0)
        if stage.sched.step_size < 1:
            raise ConfigError(f"{key}.sched.step_size must be >= 1 (epochs), got {stage.sched.step_size}")
        if not 0 < stage.sched.gamma <= 1:
            raise ConfigError(f"{key}.sched.gamma must be in (0, 1], got {stage.sched.gamma}")
        for module, mult in stage.lr_mult.items():
            positive(f"{key}.lr_mult.{module}", mult)
        _layer_decay(f"{key}.layer_decay", stage.layer_decay)
        plateau = stage.until_plateau
        if plateau is not None:  # min_delta and metric also while patience is null (the plateau off)
            _plateau(f"{key}.until_plateau.", plateau.patience, plateau.min_delta, plateau.metric)


def _layer_decay(key: str, value: Optional[float]) -> None:
    if value is not None and not 0 < value <= 1:
        raise ConfigError(f"{key} must be null or in (0, 1], got {value}")


def _plateau(prefix: str, patience: Optional[int], min_delta: float, metric: str) -> None:
    """A stage's until_plateau.* or schedule.auto's plateau keys (`prefix`: where they sit)."""
    if patience is not None and patience < 1:
        raise ConfigError(f"{prefix}patience must be >= 1, got {patience}")
    positive(f"{prefix}min_delta", min_delta, strict=False)
    choice(f"{prefix}metric", metric, ("val_acc", "val_loss"))


def _check_auto(cfg: Config) -> None:
    """schedule.auto (schedule=auto): the plan's keys; the stages it generates; what it decides itself."""
    auto, key = cfg.schedule.auto, "schedule.auto"
    if cfg.schedule.stages:
        raise ConfigError(f"{key}.enabled=true generates the stages, but schedule.stages has "
                          f"{', '.join(cfg.schedule.stages)}: use schedule=auto alone, or {key}.enabled=false")
    seen: dict = {}
    for i, group in enumerate(auto.groups):
        if not group:
            raise ConfigError(f"{key}.groups[{i}] is empty: list the modules that stage adds, e.g. [layer4]")
        for module in group:
            if module in seen:
                raise ConfigError(f"{key}.groups: {module} is in groups[{seen[module]}] and groups[{i}]; list it once")
            seen[module] = i
    if auto.max_epochs < 1:
        raise ConfigError(f"{key}.max_epochs must be >= 1, got {auto.max_epochs}")
    _plateau(f"{key}.", auto.patience, auto.min_delta, auto.metric)  # patience is never null here: the plan's end
    positive(f"{key}.lr_scale", auto.lr_scale)
    _layer_decay(f"{key}.layer_decay", auto.layer_decay)
    if str(cfg.stage) != "all":
        raise ConfigError(f"stage={cfg.stage}: schedule=auto plans and runs every stage; to run one of them, replay "
                          "the run's plan: schedule=RUN_DIR/schedule.yaml stage=...")
    if cfg.lr is not None:
        raise ConfigError(f"lr={cfg.lr}: schedule=auto finds each stage's lr by a range test; scale them with "
                          f"{key}.lr_scale, or set the range with lr_find.min_lr / lr_find.max_lr")
