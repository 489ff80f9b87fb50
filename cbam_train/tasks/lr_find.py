"""`cbam-train task=lr_find`: an exponential lr sweep over one stage's trainable parameters (Smith 2017,
"Cyclical Learning Rates", sec. 3.3; fastai's lr_find), from the weights that stage would start from. The
loss per step, smoothed; a suggested lr and the override that sets it; lr_find.json and lr_find.png."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from cbam_train.config.errors import UserError
from cbam_train.config.schema import Config
from cbam_train.config.tasks import JobInfo
from cbam_train.reporting.charts import draw_lr_find
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.atomic import write_json_atomic
from cbam_train.training import distributed
from cbam_train.training.device import setup_device
from cbam_train.training.range_test import (
    describe_suggestion,
    sweep_record,
    sweep_stage,
)
from cbam_train.training.session import build_stage
from cbam_train.training.startup import Started, load_weights, prepare_data, start_run

LR_FIND_FILES = ("lr_find.json", "lr_find.png", "train.log")


def override_for(cfg: Config, stage_name: str, lr: float) -> Optional[str]:
    """The override that sets the stage's lr: `lr=` when one is given (it sets the first running stage's lr,
    which is the swept stage, and would win over schedule.stages.<stage>.lr); None under schedule=auto, which
    runs this same test at the stage's start (and refuses both overrides)."""
    if cfg.schedule.auto.enabled:
        return None
    value = f"{lr:.1e}"
    return f"lr={value}" if cfg.lr is not None else f"schedule.stages.{stage_name}.lr={value}"


def run_lr_find(cfg: Config, run_dir: Path, record: Optional[dict] = None, job: Optional[JobInfo] = None) -> dict:
    """Sweep the lr of the first stage that runs (`stage=`); write lr_find.json and lr_find.png, no weights."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if distributed.from_env().enabled:  # every rank would sweep alone and write the same files
        raise UserError("task=lr_find runs in one process: start it without torchrun (and scale the suggestion "
                        "with the global batch yourself)")
    started = start_run(cfg, run_dir, record, required=LR_FIND_FILES)
    with started.rep.closed_after():
        return _lr_find(cfg, run_dir, started, t0)


def _lr_find(cfg: Config, run_dir: Path, started: Started, t0: float) -> dict:
    f, stage, model, device, rep = cfg.lr_find, started.stages[0], started.model, started.device, started.rep
    splits, loaders = prepare_data(cfg, device, rep)
    try:
        # as a training run opens this stage: its initial weights, device and precision, trainable set, optimizer
        load_weights(cfg, model, [stage], rep)
        amp = setup_device(model, cfg.device, device)
        parts = build_stage(model, stage, cfg)
        groups = parts.groups
        rep.banner(f"lr_find: stage {stage.index}/{len(cfg.schedule.stages)} '{stage.name}', {f.steps} steps, "
                   f"lr {f.min_lr:.1e} -> {f.max_lr:.1e}, training {', '.join(stage.trainable)}")
        if len(groups) > 1:
            rep.print("lr per group: " + "; ".join(f"x{g['lr_mult']:g} {', '.join(g['modules'])}" for g in groups))
        with rep.progress(f.steps, "lr_find") as bar:
            def on_step(step: int, lr: float, loss: float, smoothed: float) -> None:
                bar(step)
                if step % cfg.log.every_n_steps == 0:
                    rep.print(f"lr_find step {step}/{f.steps} lr {lr:.2e} loss {loss:.4f} smoothed {smoothed:.4f}")

            result = sweep_stage(cfg, parts.step_model, parts.optimizer, loaders.train, device, amp, on_step)
    finally:
        loaders.close()
    out = sweep_record(result, f, stage, groups)
    out["suggestion"]["override"] = override_for(cfg, stage.name, out["suggestion"]["lr"])
    out.update({"optimizer": cfg.optim.name, "batch_size": cfg.data.batch_size, "train_images": len(splits.train),
                "loader": loaders.kind, "device": str(device), "precision": amp.name,
                "wall_time_s": round(time.perf_counter() - t0, 3)})
    write_json_atomic(run_dir / "lr_find.json", out)
    draw_lr_find(out, run_dir / "lr_find.png", f"{run_dir}: stage {stage.index} '{stage.name}', {cfg.optim.name}, "
                 f"batch {cfg.data.batch_size}, {out['steps_run']} steps")
    _report(rep, out, run_dir)
    return out


def _report(rep: Reporter, out: dict, run_dir: Path) -> None:
    """How the sweep ended, the suggestion and how it was chosen, the override that uses it, the files."""
    stop, s, steps = out["stop"], out["suggestion"], out["settings"]["steps"]
    if stop is None:
        rep.print(f"lr_find: ran all {steps} steps; the smoothed loss did not diverge up to lr {out['lrs'][-1]:.1e}")
    elif stop["reason"] == "diverged":
        rep.print(f"lr_find: stopped at step {stop['step']}/{steps} (lr {stop['lr']:.1e}): smoothed loss "
                  f"{stop['smoothed_loss']:.4g} > {stop['diverge_factor']:g} x the best "
                  f"{stop['best_smoothed_loss']:.4g}")
    else:
        rep.print(f"lr_find: stopped at step {stop['step']}/{steps} (lr {stop['lr']:.1e}): the loss was "
                  f"{stop['loss']}")
    how = describe_suggestion(s)
    rep.print(f"suggested lr: {s['lr']:.1e}: {how}", quiet_too=True)
    rep.print(f"to use it: {s['override']}" if s["override"] else "to use it: nothing to set; schedule=auto runs "
              "this same test when the stage starts", quiet_too=True)
    rep.print(f"wrote {run_dir / 'lr_find.json'} and lr_find.png")
