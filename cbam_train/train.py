"""The training loop: one epoch, evaluation, and the staged run that ties config, data and model."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbam_train.augment import build_eval_transform, build_train_transform
from cbam_train.checkpoint import atomic_save, load_initial_weights, load_state_dict_file, load_strict
from cbam_train.config import Config, UserError
from cbam_train.data import build_splits, make_loader
from cbam_train.models import build_model
from cbam_train.report import Reporter
from cbam_train.schedule import (apply_stage, check_trainable, frozen_new_modules, resolve_stages,
                                 trainable_parameters)

RUN_FILES = ("metrics.jsonl", "summary.json", "model.pt")


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); exit 1."""

    exit_code = 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    return torch.device(name)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_optimizer(params: Iterable[nn.Parameter], cfg, lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer over exactly the given (trainable) parameters."""
    params = list(params)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise UserError(f"optim.name: unknown optimizer {cfg.name!r}; choose one of: adam, sgd")


def train_one_epoch(model: nn.Module, loader, opt: torch.optim.Optimizer, device: torch.device,
                    on_step: Callable, every_n_steps: int, where: str) -> dict:
    """One pass over the loader. Loss/accuracy sums stay on the device; the host syncs every N steps."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, t0 = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if step % every_n_steps == 0 or step == len(loader):
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise TrainingError(f"non-finite loss at {where} step {step}; lower the learning rate "
                                    "(lr=...) or check the data")
            on_step(step, {"loss": mean_loss, "acc": correct.item() / seen,
                           "img_per_s": seen / (time.perf_counter() - t0)})
        else:
            on_step(step)
    if seen == 0:
        raise UserError("the training split is empty; check data.limit and data.val_size")
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen, "n": seen,
            "time_s": time.perf_counter() - t0}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict:
    """Mean loss and accuracy over a loader, model in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
    if n == 0:
        return {"loss": None, "acc": None, "n": 0}
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n": n}


def check_run_dir(run_dir: Path) -> None:
    """Refuse to write into a folder that already holds a run's results (never overwrite them)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    taken = [f for f in RUN_FILES if (run_dir / f).exists()]
    if taken:
        raise UserError(f"run dir {run_dir} already holds a run ({', '.join(taken)}); "
                        "choose another with hydra.run.dir=PATH")
    probe = run_dir / ".write_test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run dir {run_dir} is not writable ({e.strerror}); choose another with hydra.run.dir=PATH")


def run(cfg: Config, run_dir: Path, config_yaml: str = "") -> dict:
    """The staged run: validate, build, train each selected stage, evaluate, write the outputs."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    stages = resolve_stages(cfg.schedule.stages, cfg.stage, cfg.lr)  # config errors before any work
    device = resolve_device(cfg.device.name)
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    check_trainable(model, cfg.schedule.stages)
    check_run_dir(run_dir)
    rep = Reporter(run_dir, cfg.log.mode, cfg.log.every_n_steps)
    try:
        return _run(cfg, run_dir, config_yaml, stages, model, device, rep, t_start)
    finally:
        rep.close()


def _run(cfg: Config, run_dir: Path, config_yaml: str, stages: list, model: nn.Module, device: torch.device,
         rep: Reporter, t_start: float) -> dict:
    if config_yaml:
        rep.config(config_yaml)

    splits = build_splits(cfg.data, cfg.seed, cfg.model.num_classes, warn=rep.warn)
    splits.train.transform = build_train_transform(cfg.augment, cfg.data.image_size, splits.mean, splits.std)
    eval_tf = build_eval_transform(splits.mean, splits.std)
    splits.val.transform = eval_tf
    if splits.test is not None:
        splits.test.transform = eval_tf
    rep.print(f"data: {cfg.data.name} | train {len(splits.train)} | val {len(splits.val)} | "
              f"test {len(splits.test) if splits.test is not None else 'none'} | classes {len(splits.classes)}")

    loaded = load_initial_weights(model, cfg.model.weights, cfg.model.pretrained)
    new_modules = [n for n, _ in model.named_children() if any(True for _ in _.parameters())]
    if loaded is not None:
        source = cfg.model.weights or "ImageNet (torchvision IMAGENET1K_V1)"
        new_modules = loaded.new_modules
        rep.print(f"weights: {len(loaded.loaded)} tensors from {source}; newly initialised: "
                  f"{', '.join(new_modules) or 'none'}")
    if cfg.init_from:
        load_strict(model, load_state_dict_file(cfg.init_from, "init_from"), f"init_from={cfg.init_from}")
        new_modules = []
        rep.print(f"weights: all tensors from init_from={cfg.init_from}")
    frozen_new = frozen_new_modules(stages, new_modules, model)
    if frozen_new:
        first = stages[0]
        what = "; ".join(f"{s}: {', '.join(m)}" for s, m in frozen_new.items())
        rep.warn(f"stages keep newly initialised (random) modules frozen ({what}); consider adding them to the "
                 f"first stage, e.g. schedule.stages.{first.name}.trainable=[{','.join(first.trainable)},conv1,bn1]")

    pin = device.type == "cuda"
    workers = min(cfg.data.num_workers, available_cpus())  # more workers than CPUs only thrash
    if workers < cfg.data.num_workers:
        rep.print(f"data: {workers} loader workers (data.num_workers={cfg.data.num_workers}, {workers} CPUs)")
    train_loader = make_loader(splits.train, cfg.data.batch_size, True, workers, cfg.seed, pin)
    val_loader = make_loader(splits.val, cfg.data.eval_batch_size, False, workers, cfg.seed, pin)
    model.to(device)

    stage_rows = []
    for st in stages:
        names = set(trainable_parameters(model, st.trainable))
        n_params = sum(p.numel() for n, p in model.named_parameters() if n in names)
        stage_rows.append({"index": st.index, "name": st.name, "epochs": st.epochs, "lr": st.lr,
                           "trainable": list(st.trainable), "trainable_params": n_params,
                           "first_epoch": st.first_epoch, "last_epoch": st.first_epoch + st.epochs - 1})
    rep.stage_table(stage_rows)

    best_val, last_val, epochs_run = None, None, 0
    for st in stages:
        params = apply_stage(model, st.trainable, cfg.schedule.freeze_bn)
        opt = build_optimizer(params, cfg.optim, st.lr)
        rep.banner(f"stage {st.index}/{len(cfg.schedule.stages)} '{st.name}': {st.epochs} epoch(s), "
                   f"lr {st.lr:.2e}, training {', '.join(st.trainable)}")
        for e in range(st.epochs):
            epoch = st.first_epoch + e
            where = f"epoch {epoch} ({st.name})"
            with rep.progress(len(train_loader), where) as on_step:
                tr = train_one_epoch(model, train_loader, opt, device, on_step, cfg.log.every_n_steps, where)
            va = evaluate(model, val_loader, device)
            epochs_run += 1
            last_val = va["acc"]
            if va["acc"] is not None and (best_val is None or va["acc"] > best_val):
                best_val = va["acc"]
            rep.epoch({"epoch": epoch, "stage": st.index, "stage_name": st.name, "lr": st.lr,
                       "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                       "val_acc": va["acc"], "epoch_time_s": round(tr["time_s"], 4),
                       "train_images_per_s": round(tr["n"] / tr["time_s"], 2)})

    test = None
    if splits.test is not None:
        test = evaluate(model, make_loader(splits.test, cfg.data.eval_batch_size, False, workers, cfg.seed, pin),
                        device)
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / "model.pt")
    summary = {"final_val_acc": last_val, "best_val_acc": best_val,
               "test_acc": test["acc"] if test else None, "test_loss": test["loss"] if test else None,
               "epochs_run": epochs_run, "wall_time_s": round(time.perf_counter() - t_start, 3),
               "stages": [{k: r[k] for k in ("name", "epochs", "lr", "trainable", "trainable_params")}
                          for r in stage_rows],
               "device": str(device), "classes": splits.classes, "config": dataclasses.asdict(cfg)}
    rep.summary(summary)
    return summary
