"""A stage with `lr: null` (every stage of schedule=auto) gets its lr at its start from task=lr_find's range test,
run from the weights the stage starts from with its trainable set. Everything the test touches (weights, BatchNorm
statistics, EMA, loss scale, every random state) is put back after it, so the stage then trains exactly as a
fixed schedule with that lr would: the plan in schedule.yaml replays with the same metrics rows."""

from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass
from typing import Optional

from cbam_train.config.errors import TrainingError
from cbam_train.reporting.charts import draw_lr_find, safe_draw
from cbam_train.state.atomic import atomic_write, write_json_atomic
from cbam_train.state.rng import capture_rng, restore_rng
from cbam_train.state.weights import cpu_snapshot
from cbam_train.training import distributed
from cbam_train.training.auto_plan import RanStage, plan_yaml
from cbam_train.training.plateau import best_so_far
from cbam_train.training.range_test import (
    describe_suggestion,
    sweep_record,
    sweep_stage,
)
from cbam_train.training.schedule import Stage
from cbam_train.training.session import Run, build_stage
from cbam_train.training.startup import stage_table_rows

FOLDER = "lr_find"  # in the run dir: stage<k>-<name>.json and .png, one per stage whose lr was found


@dataclass
class Snapshot:
    """What a range test changes and a stage must start from: CPU copies and the random states."""

    model: dict
    ema: Optional[dict]
    scaler: Optional[dict]
    rng: dict


def take_snapshot(run: Run) -> Snapshot:
    return Snapshot(cpu_snapshot(run.model.state_dict()), cpu_snapshot(run.ema.state_dict()) if run.ema else None,
                    run.amp.scaler.state_dict() if run.amp.scaler is not None else None,
                    capture_rng(run.loaders.generators))


def put_back(run: Run, snap: Snapshot) -> None:
    run.model.load_state_dict(snap.model)
    if run.ema is not None and snap.ema is not None:
        run.ema.load_state_dict(snap.ema)
    if run.amp.scaler is not None and snap.scaler is not None:
        run.amp.scaler.load_state_dict(snap.scaler)
    restore_rng(snap.rng, run.loaders.generators)


def settle_lr(run: Run, stage: Stage) -> Stage:
    """The stage with its lr: as planned, the one its range test found earlier in this run (a resume reads it
    from the checkpoint: the test is not run again), or found now (then the schedule table again, and schedule.yaml)."""
    if stage.lr is not None:
        return stage
    found = run.state.found_lr.get(stage.name)
    if found is not None:
        return _settle(run, stage, found)
    found = find_lr(run, stage)
    run.state.found_lr[stage.name] = found
    if run.rep.tracker is not None:
        run.rep.tracker.log_params({f"schedule.stages.{stage.name}.lr_found": found["lr"]})
    settled = _settle(run, stage, found)
    run.rep.stage_table(run.stage_rows)
    write_plan(run)
    return settled


def settle_found(run: Run) -> None:
    """Every stage whose lr a range test found before a resume: its lr, in the run's stages, table and curves."""
    for stage in list(run.stages):
        if stage.lr is None and stage.name in run.state.found_lr:
            _settle(run, stage, run.state.found_lr[stage.name])


def _settle(run: Run, stage: Stage, found: dict) -> Stage:
    settled = dataclasses.replace(stage, lr=found["lr"])
    i = [s.name for s in run.stages].index(stage.name)
    run.stages[i] = settled
    run.stage_rows[i] = {**stage_table_rows(run.model, [settled])[0], "lr_found": found}
    run.rep.update_stages(run.stage_rows)
    return settled


def write_plan(run: Run) -> None:
    """schedule.yaml in the run dir (rank 0): the plan as it has run so far, a fixed schedule that replays it.
    Written when a stage's lr is found and when a stage ends."""
    if not run.dist.is_main or not (run.cfg.schedule.auto.enabled or run.state.found_lr):
        return
    ran = []
    for name, plan in run.cfg.schedule.stages.items():
        rows = run.state.stage_rows(name)
        until = plan.until_plateau if plan.until_plateau is not None and plan.until_plateau.patience else None
        best = best_so_far(rows, until)[1] if rows and until is not None and until.restore_best else None
        ran.append(RanStage(name, plan, run.state.found_lr.get(name), [r["epoch"] for r in rows],
                            rows[-1].get("stage_end") if rows else None, best if rows and rows[-1].get("stage_end")
                            else None))
    others = [o for o in run.checkpointer.parts.overrides
              if not o.lstrip("+~").startswith(("schedule", "resume", "lr_find", "hydra"))]
    path = run.run_dir / "schedule.yaml"
    header = [f"The stages of {run.run_dir} as they ran: the plan schedule=auto made and the lr each stage's range",
              "test found. Replay it as a fixed schedule (the same metrics rows on the same device), or edit it:",
              f"  cbam-train {shlex.join([f'schedule={path}', *others])}"]
    text = plan_yaml(ran, run.cfg.schedule.freeze_bn, header).encode()
    atomic_write(path, lambda f: f.write(text))


def _sweep(run: Run, stage: Stage) -> dict:
    """Rank 0's range test of the stage, from its current state, which is put back afterwards: its record."""
    cfg, f = run.cfg, run.cfg.lr_find
    run.rep.print(f"stage {stage.index}/{len(run.stages)} '{stage.name}': lr range test, {f.min_lr:.1e} -> "
                  f"{f.max_lr:.1e} over {f.steps} steps, training {', '.join(stage.trainable)}")
    snap = take_snapshot(run)
    try:
        parts = build_stage(run.model, dataclasses.replace(stage, lr=f.min_lr), cfg, device=run.device)
        with run.rep.progress(f.steps, f"range test ({stage.name})") as bar:
            result = sweep_stage(cfg, parts.step_model, parts.optimizer, run.loaders.train, run.device, run.amp,
                                 lambda step, *_: bar(step))
    finally:
        put_back(run, snap)
    return sweep_record(result, f, stage, parts.groups)


def find_lr(run: Run, stage: Stage) -> dict:
    """Run the range test (rank 0; the others take its result), put the run's state back, write the stage's
    lr_find json and picture; return RunState.found_lr's entry for the stage."""
    cfg, f, t0 = run.cfg, run.cfg.lr_find, time.perf_counter()
    record, error = None, None
    if run.dist.is_main:
        try:
            record = _sweep(run, stage)
        except Exception as e:  # under torchrun the other ranks wait for its result: they get the error instead
            if not run.dist.enabled:
                raise
            error = e
    record, failed = distributed.broadcast((record, f"{type(error).__name__}: {error}" if error else None), run.dist)
    if error is not None:
        raise error
    if failed:
        raise TrainingError(f"rank 0's lr range test of stage '{stage.name}' failed: {failed}")
    scale = cfg.schedule.auto.lr_scale if cfg.schedule.auto.enabled else 1.0
    suggestion = record["suggestion"]
    picture = f"{FOLDER}/stage{stage.index}-{stage.name}.png"
    found = {"lr": suggestion["lr"] * scale, "suggested": suggestion["lr"], "lr_scale": scale,
             "method": suggestion["method"], "min_lr": f.min_lr, "max_lr": f.max_lr, "steps": f.steps,
             "steps_run": record["steps_run"], "stop": (record["stop"] or {}).get("reason"), "picture": picture,
             "seconds": round(time.perf_counter() - t0, 2)}
    if run.dist.is_main:
        _write(run, stage, record, found)
    return found


def _write(run: Run, stage: Stage, record: dict, found: dict) -> None:
    """lr_find/stage<k>-<name>.json and .png (task=lr_find's files, for this stage) and the console's lines."""
    folder = run.run_dir / FOLDER
    folder.mkdir(exist_ok=True)
    json_path = folder / f"stage{stage.index}-{stage.name}.json"
    write_json_atomic(json_path, {**record, "found_lr": found})
    png = run.run_dir / found["picture"]
    safe_draw(lambda: draw_lr_find(record, png, f"{run.run_dir}: stage {stage.index} '{stage.name}', range test "
                                   "at its start"), png, run.rep.warn)
    stop = record["stop"]
    ended = (f"stopped at step {stop['step']} ({stop['reason']})" if stop is not None else
             f"ran all {found['steps']} steps")
    scaled = f" x lr_scale {found['lr_scale']:g}" if found["lr_scale"] != 1 else ""
    run.rep.print(f"stage '{stage.name}': range test {ended} in {found['seconds']:.1f} s; suggested "
                  f"{found['suggested']:.3g}: {describe_suggestion(record['suggestion'])}")
    run.rep.print(f"stage '{stage.name}': lr {found['lr']:.3g}{scaled} ({found['picture']})", quiet_too=True)


def found_lr_summary(found: Optional[dict]) -> Optional[dict]:
    """summary.json's account of a found lr (None for a stage whose lr was set)."""
    if found is None:
        return None
    keys = ("lr", "suggested", "lr_scale", "method", "min_lr", "max_lr", "steps", "steps_run", "stop", "picture")
    return {k: found[k] for k in keys}

