"""schedule=auto's plan, as pure functions: the stages generated from the network's module names (gradual
unfreezing from the head), and the plan as it ran written back as a schedule file that replays it."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import yaml

from cbam_train.config.errors import ConfigError
from cbam_train.config.schema import AutoScheduleConfig, PlateauConfig, SchedConfig, StageConfig
from cbam_train.state.weights import group_of, with_stem_bn

HEAD = ("fc", "cbam")  # what the first stage always trains: the new classifier and the attention modules
HEAD_STAGE = "head"


def plan_stages(auto: AutoScheduleConfig, param_names: Sequence[str], new_modules: Sequence[str]) -> dict:
    """{stage name: StageConfig} in run order. The first stage ('head') trains fc, every CBAM module and each module
    the initial weights did not fill (`new_modules`, e.g. a CIFAR stem under ImageNet weights: conv1, and bn1 with
    it); each group of auto.groups then adds its modules not training yet (a group left with none adds no stage).
    Every stage trains what the ones before it did, has lr null (found at its start), at most auto.max_epochs and a
    plateau end."""
    tops = list(dict.fromkeys(group_of(n) for n in param_names))  # conv1, bn1, layer1..4, fc, cbam, in model order
    new = with_stem_bn(list(new_modules))
    training = [m for m in HEAD if m in tops] + [m for m in tops if m in new and m not in HEAD]
    stages = {HEAD_STAGE: _stage(auto, training)}
    for i, group in enumerate(auto.groups):
        for module in group:
            if not any(n == module or n.startswith(module + ".") for n in param_names):
                raise ConfigError(f"schedule.auto.groups[{i}]: unknown module {module!r}; known: "
                                  f"{', '.join(t for t in tops if t not in HEAD)} (or deeper paths, e.g. layer4.1)")
        added = [m for m in group if m not in training]
        if not added:
            continue
        training = training + added
        stages["_".join(m.replace(".", "_") for m in added)] = _stage(auto, training)
    return stages


def _stage(auto: AutoScheduleConfig, trainable: list) -> StageConfig:
    plateau = PlateauConfig(patience=auto.patience, min_delta=auto.min_delta, metric=auto.metric,
                            restore_best=auto.restore_best)
    return StageConfig(epochs=auto.max_epochs, lr=None, trainable=list(trainable), layer_decay=auto.layer_decay,
                       until_plateau=plateau)


def stages_from_saved(saved: dict) -> dict:
    """The plan a checkpoint's config holds (its schedule.stages, as dataclasses.asdict wrote them), as StageConfigs:
    a resumed auto run continues the plan it made, whatever the weights files hold now."""
    out = {}
    for name, s in saved.items():
        plateau = s.get("until_plateau")
        out[name] = StageConfig(epochs=s["epochs"], lr=s["lr"], trainable=list(s["trainable"]),
                                sched=SchedConfig(**s["sched"]), lr_mult=dict(s.get("lr_mult") or {}),
                                layer_decay=s.get("layer_decay"),
                                until_plateau=PlateauConfig(**plateau) if plateau is not None else None)
    return out


@dataclasses.dataclass
class RanStage:
    """What schedule.yaml says of a stage: its plan, its found lr (None: it did not start) and how it ran."""

    name: str
    plan: StageConfig
    found: Optional[dict]  # RunState.found_lr's entry: lr, suggested, lr_scale, picture, ...
    epochs_run: list  # the global epochs it ran
    ended: Optional[str]  # plateau | epochs | None (still running, or not started)
    best_epoch: Optional[int] = None  # the epoch whose weights it ended with (restore_best)


def plan_yaml(stages: Sequence[RanStage], freeze_bn: bool, header: Sequence[str]) -> str:
    """schedule.yaml: the stages as they ran, in conf/schedule/*.yaml's format (a fixed schedule: each found lr
    written exactly, so a replay steps with the same numbers), each stage's story in a comment above it."""
    lines = [f"# {h}" for h in header] + ["name: auto_plan", f"freeze_bn: {str(freeze_bn).lower()}", "stages:"]
    for s in stages:
        lines += [f"  # {_story(s)}", f"  {s.name}:"]
        plan = dataclasses.asdict(s.plan)
        plan["lr"] = s.found["lr"] if s.found is not None else s.plan.lr  # a fixed lr (an edited plan) stays
        body = yaml.safe_dump(plan, sort_keys=False, default_flow_style=None, width=200)
        lines += ["    " + line for line in body.rstrip().splitlines()]
    return "\n".join(lines) + "\n"


def _story(s: RanStage) -> str:
    if s.found is None and s.plan.lr is None:
        return "not started: its lr (null) is found by a range test when it starts"
    if s.found is None:
        lr = f"a fixed lr {s.plan.lr:.3g}"
    else:
        lr = (f"lr found by a range test ({s.found['picture']}): suggested {s.found['suggested']:.3g} x lr_scale "
              f"{s.found['lr_scale']:g}")
    if not s.epochs_run:
        return lr + "; no epoch ran"
    ran = f"ran epochs {s.epochs_run[0]}-{s.epochs_run[-1]} ({len(s.epochs_run)})"
    ended = {"plateau": "ended on a plateau", "epochs": "ended at its maximum", None: "still running"}[s.ended]
    best = f", weights of epoch {s.best_epoch} kept" if s.best_epoch is not None else ""
    return f"{lr}; {ran}, {ended}{best}"
