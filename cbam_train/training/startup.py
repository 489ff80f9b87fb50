"""What a run does before it trains (shared with task=bench): resolve the stages, device and model, claim
the run dir, open the reporter; load the initial weights; load the data into its loaders."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from cbam_train.config.errors import UserError, WeightsError
from cbam_train.config.schema import Config
from cbam_train.config.view import flatten
from cbam_train.data.datasets import build_splits
from cbam_train.data.imagefolder import ImageFiles
from cbam_train.data.loaders import build_loaders
from cbam_train.models import build_model
from cbam_train.reporting.reporter import Reporter, check_tensorboard
from cbam_train.reporting.tracking import MlflowTracker
from cbam_train.state.resume import Resume
from cbam_train.state.rundir import RUN_FILES, claim_run_dir
from cbam_train.state.weights import (
    load_initial_weights,
    load_state_dict_file,
    load_strict,
    new_modules_of,
    with_stem_bn,
)
from cbam_train.training import distributed
from cbam_train.training.auto_plan import plan_stages, stages_from_saved
from cbam_train.training.device import available_cpus, resolve_device, seed_everything, set_threads
from cbam_train.training.distributed import Dist
from cbam_train.training.schedule import (
    check_trainable,
    frozen_new_modules,
    module_names,
    param_groups,
    resolve_stages,
    trainable_parameters,
)


@dataclass
class Started:
    """What start_run resolved: the stages to run, the device, the model (on the CPU), the reporter."""

    stages: list
    device: torch.device
    model: nn.Module
    rep: Reporter
    dist: Dist = Dist()
    resume: Optional[Resume] = None  # what resume= points at (None: a new run)


def start_run(cfg: Config, run_dir: Path, record: Optional[dict], required: tuple = RUN_FILES,
              resume: Optional[Resume] = None, dist: Dist = Dist(), tracker: Optional[MlflowTracker] = None) -> Started:
    """Everything that can fail fast, before any data is read.

    Only after the run dir is known to be free (or to be the resumed run's own) is anything written into
    it: the config record in .hydra/ (a resumed run keeps its original record). Under torchrun only rank 0
    writes anything; the other ranks get a reporter that writes nothing. `tracker` (logger=mlflow, task=train):
    rank 0 opens its store before the run dir is claimed and starts its MLflow run after.
    """
    auto = cfg.schedule.auto.enabled  # the stages come from the network, once it is built
    stages = resolve_stages(cfg.schedule.stages, cfg.stage, cfg.lr) if not auto else []
    device = distributed.init(dist, resolve_device(cfg.device.name))
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise UserError(f"init_from: file not found: {cfg.init_from}")
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    if auto:
        cfg.schedule.stages = planned_stages(cfg, model, resume)
        stages = resolve_stages(cfg.schedule.stages)
    check_trainable(model, cfg.schedule.stages)
    if dist.enabled and cfg.device.sync_bn and any(s.lr is None for s in cfg.schedule.stages.values()):
        raise UserError("device.sync_bn with a stage whose lr a range test finds (lr: null, schedule=auto): the test "
                        "runs on rank 0 alone, where SyncBatchNorm would wait for the other ranks; drop device.sync_bn "
                        "or set each stage's lr")
    if cfg.logger.tensorboard:
        check_tensorboard()
    error = None
    if dist.is_main:
        try:
            finished = resume is not None and resume.state is not None and all(
                resume.state.stage_done(stage) for stage in stages)
            if tracker is not None:  # a missing package or a bad store: one line, and the run dir stays empty
                tracker.connect()
            claim_run_dir(run_dir, record, required, resume, finished)
        except UserError as e:
            error = e
    if dist.enabled:  # the other ranks must not wait in a collective for a rank 0 that gave up
        failed = distributed.broadcast(str(error) if error else None, dist)
        if failed and not dist.is_main:
            raise UserError(failed)
    if error:
        raise error
    if not dist.is_main:
        return Started(stages, device, model, Reporter(run_dir, "quiet", None, write=False), dist, resume)
    rep = Reporter(run_dir, cfg.log.mode, cfg.log.curves_every_s, tensorboard=cfg.logger.tensorboard)
    if tracker is not None:
        try:
            tracker.start(run_dir, flatten(dataclasses.asdict(cfg)),
                          str(resume.path) if resume is not None and resume.path is not None else None, rep.warn)
        except UserError:
            rep.close("FAILED")
            raise
        rep.tracker = tracker
    return Started(stages, device, model, rep, dist, resume)


def planned_stages(cfg: Config, model: nn.Module, resume: Optional[Resume]) -> dict:
    """schedule=auto's stages: a resumed run's own plan (from its checkpoint's config), else planned from the model
    and what its initial weights leave new (auto_plan.plan_stages)."""
    if resume is not None and resume.state is not None and resume.state.checkpoint is not None:
        return stages_from_saved(resume.state.saved_config["schedule"]["stages"])
    new = new_modules_of(model, cfg.model.weights, cfg.model.pretrained, cfg.init_from)
    return plan_stages(cfg.schedule.auto, [n for n, _ in model.named_parameters()], new)


def load_weights(cfg: Config, model: nn.Module, stages: list, rep: Reporter) -> None:
    """model.weights / model.pretrained, then init_from; report new modules and warn once about frozen ones."""
    if cfg.model.weights and not Path(cfg.model.weights).expanduser().is_file():  # also when init_from wins
        raise WeightsError(f"model.weights: file not found: {cfg.model.weights}")
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
        what = "; ".join(f"{stage}: {', '.join(modules)}" for stage, modules in frozen_new.items())
        add = with_stem_bn([m for m in next(iter(frozen_new.values())) if m not in first.trainable], first.trainable)
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
    threads = set_threads(cfg.device.threads)
    workers = min(cfg.data.num_workers, available_cpus())  # more workers than CPUs only thrash
    t0 = time.perf_counter()
    loaders = build_loaders(splits, cfg.data, cfg.augment, device, cfg.seed, workers, cfg.device.compile, shard)
    load = splits.train.load
    if isinstance(load, ImageFiles) and load.bad:  # data.bad_images=skip (under error, reading them raised)
        bad = load.bad
        first = load.paths[next(iter(bad))]
        rep.warn(f"data.bad_images=skip: left out {len(bad)} unreadable image(s), e.g. {first} "
                 f"({next(iter(bad.values()))})")
    how = (f"in {device.type} memory (loaded in {time.perf_counter() - t0:.1f} s), batched augmentation"
           if loaders.kind == "memory" else f"torchvision DataLoader, {workers} worker(s)")
    rep.print(f"data: {cfg.data.name} | train {len(splits.train)} | val {len(splits.val)} | "
              f"test {len(splits.test) if splits.test is not None else 'none'} | classes {len(splits.classes)} | "
              f"{how} | {threads}")
    return splits, loaders


def stage_table_rows(model: nn.Module, stages: list) -> list:
    """One row per stage for the stage table and summary.json: its settings and how many parameters train."""
    rows = []
    for stage in stages:
        names = set(trainable_parameters(model, stage.trainable))
        rows.append({"index": stage.index, "name": stage.name, "epochs": stage.epochs, "lr": stage.lr,
                     "until_plateau": stage.plateau is not None,
                     "trainable": list(stage.trainable),
                     "trainable_params": sum(p.numel() for n, p in model.named_parameters() if n in names),
                     "first_epoch": stage.first_epoch, "last_epoch": stage.last_epoch,
                     "lr_groups": [{"lr": g["lr"], "modules": g["modules"]} for g in param_groups(model, stage)]})
    return rows
