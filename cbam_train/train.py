"""The staged run: config, data and model tied together; checkpoints at every epoch, exact resume, and
a clean stop on SIGINT / SIGTERM or a non-finite loss."""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from cbam_train import distributed
from cbam_train.atomic import atomic_save
from cbam_train.checkpoint import (CheckpointError, cpu_snapshot, load_initial_weights, load_state_dict_file,
                                   load_strict)
from cbam_train.config import Config, ConfigError, UserError
from cbam_train.data import build_splits
from cbam_train.engine import (EpochState, NonFiniteLoss, StepExtras, TrainingError, available_cpus, build_ema,
                               build_optimizer, compile_for_stage, evaluate, resolve_device, seed_everything,
                               setup_device, train_one_epoch)
from cbam_train.interrupt import Interrupted, StopRequest
from cbam_train.loaders import build_loaders
from cbam_train.models import build_model
from cbam_train.report import Reporter, check_tensorboard
from cbam_train.distributed import Dist
from cbam_train.resume import (Resume, RunSaver, capture_rng, check_resume_config, check_resume_data,
                               checkpoint_names, find_resume, restore_rng)
from cbam_train.rundir import RUN_FILES, claim_run_dir
from cbam_train.schedule import (apply_stage, check_trainable, frozen_new_modules, module_names, resolve_stages,
                                 stage_scheduler, trainable_parameters)

STOP_POLL_STEPS = 10  # data-parallel: steps between the collective checks of the stop flag


def start_run(cfg: Config, run_dir: Path, record: Optional[dict], required: tuple = RUN_FILES,
              resume: Optional[Resume] = None, dist: Dist = Dist()) -> tuple:
    """Everything that can fail fast, before any data is read: (stages, device, model, reporter).

    Only after the run dir is known to be free (or to be the resumed run's own) is anything written into
    it: the config record in .hydra/ (a resumed run keeps its original record). Under torchrun only rank 0
    writes anything; the other ranks get a reporter that writes nothing.
    """
    stages = resolve_stages(cfg.schedule.stages, cfg.stage, cfg.lr)
    device = distributed.init(dist, resolve_device(cfg.device.name))
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise UserError(f"init_from: file not found: {cfg.init_from}")
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    check_trainable(model, cfg.schedule.stages)
    if cfg.logger.name == "tensorboard":
        check_tensorboard()
    error = None
    if dist.is_main:
        try:
            claim_run_dir(run_dir, record, required, resume, stages[-1].last_epoch)
        except UserError as e:
            error = e
    if dist.enabled:  # the other ranks must not wait in a collective for a rank 0 that gave up
        failed = distributed.broadcast(str(error) if error else None, dist)
        if failed and not dist.is_main:
            raise UserError(failed)
    if error:
        raise error
    if not dist.is_main:
        return stages, device, model, Reporter(run_dir, "quiet", None, write=False)
    return stages, device, model, Reporter(run_dir, cfg.log.mode, cfg.log.curves_every_s,
                                           tensorboard=cfg.logger.name == "tensorboard")


def run(cfg: Config, run_dir: Path, record: Optional[dict] = None, overrides: Optional[list] = None) -> dict:
    """The staged run: validate, build, train each selected stage (or the rest of them, with resume=),
    evaluate, write the outputs. `overrides` (the command line) are stored in every checkpoint.
    Under torchrun (WORLD_SIZE > 1) every rank runs this; rank 0's run dir is the run's."""
    t_start = time.perf_counter()
    dist = distributed.from_env()
    own_dir = Path(run_dir)
    resume = find_resume(cfg.resume)
    stages, device, model, rep = start_run(cfg, own_dir, record, resume=resume, dist=dist)
    run_dir = Path(distributed.broadcast(str(own_dir), dist))  # Hydra's ${now} may differ by a second per rank
    try:
        with StopRequest(rep.warn) as stop:
            return _run(cfg, run_dir, (record or {}).get("config.yaml", ""), list(overrides or []), stages, model,
                        device, rep, t_start, resume, stop, dist)
    except (UserError, TrainingError, Interrupted) as e:
        # the console gets it from the CLI; the log must say why the run stopped
        rep.log_only(f"{getattr(e, 'label', 'error')}: {e}")
        raise
    finally:
        rep.close()
        distributed.shutdown(dist)
        if own_dir != run_dir:  # another rank's empty Hydra dir
            try:
                own_dir.rmdir()
            except OSError:
                pass


def load_weights(cfg: Config, model: nn.Module, stages: list, rep: Reporter) -> None:
    """model.weights / model.pretrained, then init_from; report new modules and warn once about frozen ones."""
    if cfg.init_from:  # every tensor comes from init_from: the ImageNet / model.weights file is not needed
        load_strict(model, load_state_dict_file(cfg.init_from, "init_from"), f"init_from={cfg.init_from}")
        rep.print(f"weights: all tensors from init_from={cfg.init_from}")
        return
    loaded = load_initial_weights(model, cfg.model.weights, cfg.model.pretrained)
    new_modules = module_names(model)
    if loaded is not None:
        source = cfg.model.weights or "ImageNet (torchvision IMAGENET1K_V1)"
        new_modules = loaded.new_modules
        rep.print(f"weights: {len(loaded.loaded)} tensors from {source}; newly initialised: "
                  f"{', '.join(new_modules) or 'none'}")
    frozen_new = frozen_new_modules(stages, new_modules, model)
    if frozen_new:
        first = stages[0]
        what = "; ".join(f"{s}: {', '.join(m)}" for s, m in frozen_new.items())
        add = [m for m in next(iter(frozen_new.values())) if m not in first.trainable]
        if "conv1" in add and "bn1" not in add + list(first.trainable):
            add.append("bn1")  # loaded bn1 statistics describe the old stem's output, not the new conv1's
        rep.warn(f"stages keep newly initialised (random) modules frozen ({what}); consider training them from the "
                 f"first stage: schedule.stages.{first.name}.trainable=[{','.join(list(first.trainable) + add)}]")


def prepare_data(cfg: Config, device: torch.device, rep: Reporter, shard: tuple = (0, 1)) -> tuple:
    """(splits, loaders): the data split and loaded into the configured kind of loader (the training
    loader yielding this rank's part of each global batch under torchrun)."""
    rank, world = shard
    if world > 1 and rank != 0:  # rank 0 downloads / decodes (and caches) first; the others then read it
        distributed.barrier()
    splits = build_splits(cfg.data, cfg.seed, cfg.model.num_classes, warn=rep.warn)
    if world > 1 and rank == 0:
        distributed.barrier()
    workers = min(cfg.data.num_workers, available_cpus())  # more workers than CPUs only thrash
    t0 = time.perf_counter()
    loaders = build_loaders(splits, cfg.data, cfg.augment, device, cfg.seed, workers, cfg.device.compile, shard)
    bad = getattr(splits.train.load, "bad", None)
    if bad:  # data.bad_images=skip (under error, reading them raised)
        first = splits.train.load.paths[next(iter(bad))]
        rep.warn(f"data.bad_images=skip: left out {len(bad)} unreadable image(s), e.g. {first} "
                 f"({next(iter(bad.values()))})")
    how = (f"in {device.type} memory (loaded in {time.perf_counter() - t0:.1f} s), batched augmentation"
           if loaders.kind == "memory" else f"torchvision DataLoader, {workers} worker(s)")
    rep.print(f"data: {cfg.data.name} | train {len(splits.train)} | val {len(splits.val)} | "
              f"test {len(splits.test) if splits.test is not None else 'none'} | classes {len(splits.classes)} | "
              f"{how}")
    return splits, loaders


def stage_table_rows(model: nn.Module, stages: list) -> list:
    rows = []
    for st in stages:
        names = set(trainable_parameters(model, st.trainable))
        rows.append({"index": st.index, "name": st.name, "epochs": st.epochs, "lr": st.lr,
                     "trainable": list(st.trainable),
                     "trainable_params": sum(p.numel() for n, p in model.named_parameters() if n in names),
                     "first_epoch": st.first_epoch, "last_epoch": st.last_epoch})
    return rows


def _run(cfg: Config, run_dir: Path, config_yaml: str, overrides: list, stages: list, model: nn.Module,
         device: torch.device, rep: Reporter, t_start: float, resume: Optional[Resume], stop: StopRequest,
         dist: Dist = Dist()) -> dict:
    if config_yaml:
        rep.config(config_yaml)
    ckpt = resume.ckpt if resume is not None else None
    if resume is not None:
        rep.print(resume.describe())
    splits, loaders = prepare_data(cfg, device, rep, (dist.rank, dist.world))
    try:
        if dist.enabled:
            rep.print(f"data-parallel: {dist.world} processes, global batch {cfg.data.batch_size * dist.world} "
                      f"({cfg.data.batch_size} per process), {len(loaders.train)} steps per epoch")
        data = {"classes": list(splits.classes), "mean": list(splits.mean), "std": list(splits.std),
                "n_train": len(splits.train), "n_val": len(splits.val)}
        if ckpt is not None:
            source = f"resume={resume.path}"
            changed = check_resume_config(ckpt["config"], dataclasses.asdict(cfg), str(resume.path))
            if changed:
                rep.warn(f"resuming with changed settings, so results will differ from an uninterrupted run: "
                         f"{'; '.join(changed)}")
            check_resume_data(ckpt["data"], data, str(resume.path))
            if ckpt.get("world", 1) != dist.world:
                raise UserError(f"resume: {resume.path} was written by {ckpt.get('world', 1)} process(es); "
                                f"resume it with "
                                f"as many (torchrun --nproc_per_node=N), or start a new run with init_from=...")
            if dist.enabled:  # each rank continues from its own random state and running sums
                ckpt = {**ckpt, "rng": ckpt["rng_ranks"][dist.rank], "partial": ckpt["partial_ranks"][dist.rank]}
            load_strict(model, ckpt["model"], source)
        else:
            load_weights(cfg, model, stages, rep)
        model = distributed.sync_batchnorm(model, dist, device, cfg.device.sync_bn)
        amp = setup_device(model, cfg.device, device)
        if ckpt is not None and amp.scaler is not None and ckpt.get("scaler"):
            amp.scaler.load_state_dict(ckpt["scaler"])
        ema = build_ema(model, cfg.train.ema_decay)  # evaluated and saved instead of the raw weights when on
        if ema is not None and ckpt is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        judged = ema.module if ema is not None else model  # the weights val/test accuracy and model.pt refer to
        stage_rows = stage_table_rows(model, stages)
        rep.stage_table(stage_rows)

        history = list(ckpt["history"]) if ckpt is not None else []
        if resume is not None:
            rep.restore_metrics(history)  # rows written after the checkpoint are dropped, not duplicated
        done = ckpt["epoch"] if ckpt is not None else 0  # last finished epoch
        best_val = ckpt["best_val_acc"] if ckpt is not None else None
        pending = ckpt  # RNG, optimizer and mid-epoch state still to restore, at the first epoch that runs
        save = RunSaver(cfg, overrides, run_dir, model, amp.scaler, data, dist)
        steps_seen = [0]

        def should_stop() -> bool:
            """The stop flag, agreed by all ranks every STOP_POLL_STEPS steps (one tiny collective): torchrun
            SIGKILLs its workers 30 s after passing a signal on, so the stop must come well before that."""
            steps_seen[0] += 1
            if not dist.enabled:
                return stop()
            return steps_seen[0] % STOP_POLL_STEPS == 0 and distributed.any_(stop(), dist, device)

        every_epochs = cfg.train.checkpoint_every_n_epochs
        try:
            stop.arm()
            for st in stages:
                last_epoch = st.last_epoch
                if last_epoch <= done:
                    continue
                params = apply_stage(model, st.trainable, cfg.schedule.freeze_bn)
                opt = build_optimizer(params, cfg.optim, st.lr)
                extras = StepExtras(cfg.train.label_smoothing, stage_scheduler(opt, st, len(loaders.train)), ema,
                                    (lambda flag: distributed.any_(flag, dist, device)) if dist.enabled else None)
                if pending is not None and pending["stage_name"] == st.name:  # else the checkpoint ended its stage
                    try:
                        opt.load_state_dict(pending["optimizer"])
                        if extras.scheduler is not None and pending.get("scheduler") is not None:
                            extras.scheduler.load_state_dict(pending["scheduler"])
                    except (ValueError, KeyError) as e:
                        raise ConfigError(f"resume: the optimizer state in {resume.path} does not fit stage "
                                          f"'{st.name}' "
                                          f"({e}); its trainable modules or optim.* changed") from None
                step_model = distributed.wrap(model, dist, device)  # a new DDP wrapper for this stage's parameters
                step_model = compile_for_stage(step_model, cfg.device) if cfg.device.compile else step_model
                rep.banner(f"stage {st.index}/{len(cfg.schedule.stages)} '{st.name}': {st.epochs} epoch(s), "
                           f"lr {st.lr:.2e}, training {', '.join(st.trainable)}")
                for epoch in range(max(st.first_epoch, done + 1), last_epoch + 1):
                    where = f"epoch {epoch} ({st.name})"
                    partial = None
                    if pending is not None:
                        restore_rng(pending["rng"], loaders.generators)
                        if pending["step"]:
                            partial = EpochState(**pending["partial"])
                            loaders.skip_train_batches(partial.step)
                        pending = None
                    epoch_rng = capture_rng(loaders.generators)  # what a mid-epoch checkpoint restores before skipping

                    def mid_epoch(state: EpochState) -> None:
                        save(["last.pt"], opt, st, epoch - 1, state, epoch_rng, history, best_val, extras)

                    with rep.progress(len(loaders.train), where) as on_step:
                        try:
                            tr = train_one_epoch(step_model, loaders.train, opt, device, on_step, cfg.log.every_n_steps,
                                                 where, amp, partial, cfg.train.nan_policy, should_stop, mid_epoch,
                                                 cfg.train.checkpoint_every_n_steps, extras)
                        except NonFiniteLoss as e:
                            save.writer.wait()
                            kept = f"checkpoints/last.pt ({save.last}) is the last good state" if save.last else \
                                "no checkpoint was written in this run"
                            raise TrainingError(f"{e}; stopped, {kept}; lower the learning rate (lr=...), "
                                                "check the data, "
                                                "or set train.nan_policy=skip_batch") from None
                    if tr["stopped"]:
                        save(["last.pt"], opt, st, epoch - 1, tr["state"], epoch_rng, history, best_val, extras)
                        save.writer.wait()
                        _interrupted(stop, rep, run_dir, f"{where} step {tr['state'].step}/{len(loaders.train)}")
                    tr = distributed.reduce_epoch(tr, dist, device)
                    va = evaluate(judged, loaders.val, device, amp, flip_tta=cfg.eval.flip_tta)
                    # each rank's BatchNorm statistics differ slightly: rank 0's numbers decide (e.g. a new best)
                    va = distributed.broadcast(va, dist)
                    new_best = va["acc"] is not None and (best_val is None or va["acc"] > best_val)
                    best_val = va["acc"] if new_best else best_val
                    row = {"epoch": epoch, "stage": st.index, "stage_name": st.name, "lr": opt.param_groups[0]["lr"],
                           "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                           "val_acc": va["acc"], "skipped_batches": tr["skipped"],
                           "epoch_time_s": round(tr["time_s"], 4),
                           "train_images_per_s": round(tr["n"] / tr["time_s"], 2)}
                    history.append(row)
                    rep.epoch(row)
                    if tr["skipped"]:
                        rep.warn(f"{where}: skipped {tr['skipped']} batch(es) with a non-finite loss "
                                 "(train.nan_policy)")
                    names = checkpoint_names(epoch, every_epochs, st, new_best)
                    stopping = distributed.any_(stop(), dist, device)
                    if names or stopping:
                        save(names or ["last.pt"], opt, st, epoch, None, capture_rng(loaders.generators), history,
                             best_val, extras)
                    if stopping:
                        save.writer.wait()
                        _interrupted(stop, rep, run_dir, f"the end of {where}")
            save.writer.wait()  # the last checkpoint is on disk before the run reports success
        except BaseException:
            try:
                save.writer.wait()  # never leave a write half-done; the error already raised is the one to report
            except Exception:
                pass
            raise

        test = evaluate(judged, loaders.test, device, amp, flip_tta=cfg.eval.flip_tta) if loaders.test is not None \
            else None
        if not dist.is_main:
            return {"final_val_acc": history[-1]["val_acc"] if history else None, "best_val_acc": best_val,
                    "test_acc": test["acc"] if test else None}
        try:
            atomic_save(cpu_snapshot(judged.state_dict(), contiguous=True), run_dir / "model.pt")
        except OSError as e:
            raise CheckpointError(f"could not write {run_dir / 'model.pt'} ({e.strerror or e}); checkpoints/last.pt "
                                  f"holds the trained model: free space and finish with: {save.hint}") from None
        last_val = history[-1]["val_acc"] if history else None
        summary = {"final_val_acc": last_val, "best_val_acc": best_val,
                   "test_acc": test["acc"] if test else None, "test_loss": test["loss"] if test else None,
                   "epochs_run": len(history), "wall_time_s": round(time.perf_counter() - t_start, 3),
                   "resumed_from": str(resume.path) if resume is not None and resume.path else None,
                   "stages": [{k: r[k] for k in ("name", "epochs", "lr", "trainable", "trainable_params")}
                              for r in stage_rows],
                   "weights": "ema" if ema is not None else "final",
                   "device": str(device), "loader": loaders.kind, "precision": amp.name,
                   "classes": splits.classes, "data_mean": list(splits.mean), "data_std": list(splits.std),
                   "config": dataclasses.asdict(cfg)}
        rep.summary(summary)
        return summary
    finally:
        loaders.close()


def _interrupted(stop: StopRequest, rep: Reporter, run_dir: Path, where: str) -> None:
    name = signal.Signals(stop.signum or signal.SIGTERM).name
    rep.print(f"{name}: stopped at {where}; saved {run_dir / 'checkpoints' / 'last.pt'}", quiet_too=True)
    rep.print(f"resume with: cbam-train resume={run_dir}", quiet_too=True)
    raise Interrupted(f"{name} at {where}; resume with: cbam-train resume={run_dir}", stop.signum)
