"""The staged run: set up once (a resume restores everything before the loop), then stages, then epochs:
train, validate, record, checkpoint. A stop request or a non-finite loss ends it cleanly (stopper.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from cbam_train.config.errors import CheckpointError, TrainingError, UserError
from cbam_train.config.schema import Config
from cbam_train.config.tasks import JobInfo
from cbam_train.reporting.explain_report import StageAttention
from cbam_train.reporting.tracking import MlflowTracker
from cbam_train.state.atomic import atomic_save
from cbam_train.state.resume import check_resume, find_resume
from cbam_train.state.run_state import RunParts, RunState
from cbam_train.state.weights import cpu_snapshot
from cbam_train.training import distributed, plateau
from cbam_train.training.auto_run import found_lr_summary, settle_found, settle_lr, write_plan
from cbam_train.training.checkpointer import Checkpointer
from cbam_train.training.device import setup_device
from cbam_train.training.engine import EpochResult, evaluate, train_one_epoch
from cbam_train.training.interrupt import Interrupted, StopRequest
from cbam_train.training.optim import build_ema, stage_lr
from cbam_train.training.schedule import Stage
from cbam_train.training.session import Run, StageSession, open_stage
from cbam_train.training.startup import Started, load_weights, prepare_data, stage_table_rows, start_run
from cbam_train.training.stopper import Stopper


def run(cfg: Config, run_dir: Path, record: Optional[dict] = None, job: Optional[JobInfo] = None) -> dict:
    """The staged run: validate, build, train each selected stage (or the rest of them, with resume=),
    evaluate, write the outputs. `job`: what the CLI knows of this job (its overrides, stored in every
    checkpoint; the MLflow experiment name, the sweep; `view`, what log.show_config=compact shows). Under
    torchrun (WORLD_SIZE > 1) every rank runs this; rank 0's run dir is the run's."""
    t_start = time.perf_counter()
    dist = distributed.from_env()
    own_dir = Path(run_dir)
    resume = find_resume(cfg.resume)
    job = job or JobInfo()
    tracker = MlflowTracker(cfg.logger, job, Path.cwd()) if cfg.logger.mlflow and dist.is_main else None
    started = start_run(cfg, own_dir, record, resume=resume, dist=dist, tracker=tracker)
    run_dir = Path(distributed.broadcast(str(own_dir), dist))  # Hydra's ${now} may differ by a second per rank
    ended = "FAILED"  # how the MLflow run ends (logger=mlflow)
    try:
        with StopRequest(started.rep.warn) as signals:
            if record and record.get("config.yaml"):
                started.rep.config(record["config.yaml"], job.view, cfg.log.show_config)
            summary = _train(cfg, run_dir, started, list(job.overrides), signals, t_start)
            ended = "FINISHED"
            return summary
    except (UserError, TrainingError, Interrupted) as e:
        ended = "KILLED" if isinstance(e, Interrupted) else "FAILED"
        started.rep.log_only(f"{getattr(e, 'label', 'error')}: {e}")  # the console gets it from the CLI
        raise
    finally:
        started.rep.close(ended)
        distributed.shutdown(dist)
        if own_dir != run_dir:  # another rank's empty Hydra dir
            try:
                own_dir.rmdir()
            except OSError:
                pass


def _train(cfg: Config, run_dir: Path, started: Started, overrides: list, signals: StopRequest,
           t_start: float) -> dict:
    """Set the run up, fit it, write its results; the loaders' workers end with it."""
    run = set_up_run(cfg, run_dir, started, overrides, Stopper(signals, started.dist, started.device))
    try:
        fit(run)
        return finish(run, t_start)
    finally:
        run.loaders.close()


def set_up_run(cfg: Config, run_dir: Path, started: Started, overrides: list, stopper: Stopper) -> Run:
    """The data; the weights (initial, or everything a checkpoint restores); device, EMA; the loop's start."""
    resume = started.resume
    if resume is not None:
        started.rep.print(resume.describe())
    dist = started.dist
    splits, loaders = prepare_data(cfg, started.device, started.rep, (dist.rank, dist.world))
    try:
        waits = [s.name for s in started.stages if s.plateau is not None]
        if waits and len(splits.val) == 0 and cfg.schedule.auto.enabled:
            raise UserError("schedule=auto ends each stage on a plateau of a validation metric, but the validation "
                            "split is empty; set data.val_size > 0")
        if waits and len(splits.val) == 0:
            raise UserError(f"schedule.stages.{waits[0]}.until_plateau needs validation metrics, but the validation "
                            "split is empty; set data.val_size > 0 or turn until_plateau off")
        if dist.enabled:
            started.rep.print(f"data-parallel: {dist.world} processes, global batch "
                              f"{cfg.data.batch_size * dist.world} ({cfg.data.batch_size} per process), "
                              f"{len(loaders.train)} steps per epoch")
        return _build_run(cfg, run_dir, started, overrides, stopper, (splits, loaders))
    except BaseException:
        loaders.close()
        raise


def _build_run(cfg: Config, run_dir: Path, started: Started, overrides: list, stopper: Stopper,
             prepared: tuple) -> Run:
    """The whole `Run`: weights, scaler, EMA and the loop's position, a checkpoint's (all put back before the
    loop) or a fresh run's. `prepared`: prepare_data's (splits, loaders)."""
    (splits, loaders), dist, rep, model, resume = prepared, started.dist, started.rep, started.model, started.resume
    data = {"classes": list(splits.classes), "mean": list(splits.mean), "std": list(splits.std),
            "n_train": len(splits.train), "n_val": len(splits.val)}
    state = resume.state if resume is not None and resume.state is not None else RunState.fresh()
    resumed = state.checkpoint is not None
    if resumed:
        assert resume is not None  # the checkpoint came from resume.state
        check_resume(state, dataclasses.asdict(cfg), data, dist.world, str(resume.path), rep.warn)
        state.restore_model(model, f"resume={resume.path}")
        state.reopen_extended(started.stages)
    else:
        load_weights(cfg, model, started.stages, rep)
    model = distributed.sync_batchnorm(model, dist, started.device, cfg.device.sync_bn)
    amp = setup_device(model, cfg.device, started.device)
    ema = build_ema(model, cfg.train.ema_decay)
    if resumed:
        state.restore_scaler_and_ema(amp.scaler, ema)
    stage_rows = stage_table_rows(model, started.stages)
    rep.stage_table(stage_rows)
    if resume is not None:
        rep.restore_metrics(state.history)  # rows written after the checkpoint are dropped, not duplicated
    if resumed:
        state.restore_position(loaders.generators, loaders.skip_train_batches, dist.rank)
    parts = RunParts(model, amp.scaler, ema, dataclasses.asdict(cfg), overrides, data, dist.world)
    checkpointer = Checkpointer(run_dir, parts, loaders.generators, cfg.train.checkpoint_every_n_epochs, dist)
    attention = None
    if cfg.log.attention_report and dist.is_main and len(splits.val):
        attention = StageAttention(run_dir, splits, cfg.explain.per_class, cfg.explain.all_blocks, cfg.model.cbam.init,
                                   rep.warn)
    return Run(cfg, run_dir, dist, started.device, rep, started.stages, stage_rows, model, amp, ema, splits, loaders,
               state, checkpointer, stopper, resume.path if resume is not None else None, attention)


def fit(run: Run) -> None:
    """The recipe: each stage not yet done, each of its epochs until it ends (its epochs, or a plateau): train,
    validate, record, checkpoint. A stop request checkpoints and ends the run at the next step or epoch end."""
    with run.checkpointer:
        run.stopper.arm()
        settle_found(run)
        for stage in (s for s in run.stages if not run.state.stage_done(s)):
            stage = settle_lr(run, stage)  # lr: null (schedule=auto): its range test's, found now or before a resume
            session = open_stage(run, stage)
            while not run.state.stage_done(stage):
                epoch = run.state.next_epoch(stage)
                where = f"epoch {epoch} ({stage.name})"
                result = train_epoch(run, session, where)
                if result.stopped:  # mid-epoch: last.pt holds the epoch so far
                    run.checkpointer.mid_epoch(run.state, session, result.state)
                    stopped_at = f"{where} step {result.state.step}/{len(run.loaders.train)}"
                else:
                    end_epoch(run, session, epoch, result)
                    stopped_at = f"the end of {where}"
                if run.stopper.done:
                    run.checkpointer.wait()
                    raise run.stopper.interrupt(run.rep, run.run_dir, stopped_at)


def train_epoch(run: Run, session: StageSession, where: str) -> EpochResult:
    """One epoch of the session's stage (or the rest of a resumed one), with its progress bar."""
    run.checkpointer.start_epoch()
    partial = run.state.take_partial_epoch()
    with run.rep.progress(len(run.loaders.train), where) as on_step, \
            run.stopper.on_non_finite_loss(run.checkpointer):
        setup = dataclasses.replace(session.setup, where=where, on_step=on_step,
                                    on_checkpoint=lambda p: run.checkpointer.mid_epoch(run.state, session, p))
        return train_one_epoch(session.model, run.loaders.train, session.optimizer, setup, partial)


def end_epoch(run: Run, session: StageSession, epoch: int, result: EpochResult) -> None:
    """Validate, record the epoch's metrics row, write its checkpoints (last.pt at least when stopping)."""
    result = distributed.reduce_epoch(result, run.dist, run.device)
    val = evaluate(run.eval_model, run.loaders.val, run.device, run.amp, flip_tta=run.cfg.eval.flip_tta)
    val = distributed.broadcast(val, run.dist)  # each rank's BatchNorm statistics differ: rank 0's numbers decide
    stage = session.stage
    row = {"epoch": epoch, "stage": stage.index, "stage_name": stage.name,
           "lr": result.lr if result.lr is not None else stage_lr(session.optimizer),
           "train_loss": result.loss, "train_acc": result.acc,
           "val_loss": val["loss"], "val_acc": val["acc"], "skipped_batches": result.skipped,
           "epoch_time_s": round(result.time_s, 4), "train_images_per_s": round(result.n / result.time_s, 2)}
    if run.cfg.train.grad_clip_norm is not None:
        row["clipped_steps"] = result.clipped  # optimizer steps whose gradient norm was over the limit
    row["stage_end"] = plateau.stage_end(run.state.stage_rows(stage.name) + [row], stage.epochs, stage.plateau)
    new_best = run.state.record(row)
    run.rep.epoch(row)
    if result.skipped:
        run.rep.warn(f"epoch {epoch} ({stage.name}): skipped {result.skipped} batch(es) with a non-finite loss "
                     "(train.nan_policy)")
    if stage.plateau is not None and stage.plateau.restore_best:
        keep_stage_best(run, stage)
    if row["stage_end"]:
        end_stage(run, stage, row["stage_end"])
        if run.attention is not None:  # before the checkpoint: a run killed while drawing redoes the epoch and this
            picture, seconds = run.attention.stage_end(run.eval_model, stage, epoch, run.device)
            run.rep.print(f"attention report: {picture} ({seconds:.1f} s)")
    run.checkpointer.epoch_end(run.state, session, new_best, stage_end=bool(row["stage_end"]),
                               stopping=run.stopper.at_epoch_end())


def keep_stage_best(run: Run, stage: Stage) -> None:
    """After an epoch of a restore_best plateau stage: a CPU copy of the weights if this epoch is its best."""
    assert stage.plateau is not None  # the caller checked: only a restore_best plateau stage keeps its best
    rows = run.state.stage_rows(stage.name)
    if plateau.best_so_far(rows, stage.plateau)[1] == rows[-1]["epoch"]:
        run.state.keep_stage_best(stage.name, rows[-1]["epoch"], run.model, run.ema)


def end_stage(run: Run, stage: Stage, why: str) -> None:
    """Say why the stage ended; with restore_best, put its best weights back (before the next stage or test)."""
    rows = run.state.stage_rows(stage.name)
    if why == "plateau":
        assert stage.plateau is not None  # only a stage with until_plateau ends on a plateau
        reason = plateau.describe(rows, stage.plateau)
    else:
        reason = f"its maximum of {stage.epochs} epoch(s) ran"
    best_epoch = run.state.take_stage_best(stage.name, rows[-1]["epoch"], run.model, run.ema)
    restored = f"; restored the weights of epoch {best_epoch}" if best_epoch is not None else ""
    if stage.plateau is not None:  # a stage without one ends where the schedule table said
        run.rep.print(f"stage '{stage.name}' ended at epoch {rows[-1]['epoch']} after {len(rows)} epoch(s): "
                      f"{reason}{restored}")
    write_plan(run)


def finish(run: Run, t_start: float) -> dict:
    """Test-split accuracy, model.pt (the evaluated weights) and summary.json; the summary."""
    cfg, state, loaders = run.cfg, run.state, run.loaders
    test = evaluate(run.eval_model, loaders.test, run.device, run.amp, flip_tta=cfg.eval.flip_tta) \
        if loaders.test is not None else None
    last_val = state.history[-1]["val_acc"] if state.history else None
    if not run.dist.is_main:
        return {"final_val_acc": last_val, "best_val_acc": state.best_val_acc,
                "test_acc": test["acc"] if test else None}
    try:
        atomic_save(cpu_snapshot(run.eval_model.state_dict(), contiguous=True), run.run_dir / "model.pt")
    except OSError as e:
        raise CheckpointError(f"could not write {run.run_dir / 'model.pt'} ({e.strerror or e}); "
                              f"checkpoints/last.pt holds the trained model: free space and finish with: "
                              f"{run.checkpointer.resume_hint}") from None
    summary = {"final_val_acc": last_val, "best_val_acc": state.best_val_acc,
               "test_acc": test["acc"] if test else None, "test_loss": test["loss"] if test else None,
               "epochs_run": len(state.history), "wall_time_s": round(time.perf_counter() - t_start, 3),
               "resumed_from": str(run.resumed_from) if run.resumed_from else None,
               "stages": [stage_summary(r, state.stage_rows(r["name"]), state.found_lr.get(r["name"]))
                          for r in run.stage_rows],
               "weights": "ema" if run.ema is not None else "final",
               "device": str(run.device), "loader": loaders.kind, "precision": run.amp.name,
               "classes": run.splits.classes, "data_mean": list(run.splits.mean), "data_std": list(run.splits.std),
               "config": dataclasses.asdict(cfg)}
    run.rep.summary(summary)
    return summary


def stage_summary(table_row: dict, rows: list, found: Optional[dict] = None) -> dict:
    """summary.json's entry for a stage: its settings, the epochs it actually ran, why it ended (and which epoch's
    weights it kept), and how its lr was found (None: it was set)."""
    out = {k: table_row[k] for k in ("name", "epochs", "lr", "trainable", "trainable_params", "lr_groups")}
    ended = rows[-1].get("stage_end") if rows else None
    return {**out, "epochs_run": len(rows), "ended": ended, "lr_found": found_lr_summary(found)}
