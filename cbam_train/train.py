"""The training loop: one epoch, evaluation, and the staged run that ties config, data and model."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbam_train.checkpoint import atomic_save, load_initial_weights, load_state_dict_file, load_strict
from cbam_train.config import Config, DeviceConfig, OptimConfig, UserError
from cbam_train.data import build_splits
from cbam_train.loaders import build_loaders
from cbam_train.models import build_model
from cbam_train.report import Reporter
from cbam_train.schedule import (apply_stage, check_trainable, frozen_new_modules, module_names, resolve_stages,
                                 trainable_parameters)

RUN_FILES = ("metrics.jsonl", "summary.json", "model.pt", "train.log")


@dataclass
class Amp:
    """How a step runs: autocast dtype (None: fp32), fp16 loss scaler, memory format of the inputs."""

    name: str = "fp32"
    dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    memory_format: torch.memory_format = torch.contiguous_format


def resolve_amp(cfg: DeviceConfig, device: torch.device) -> Amp:
    """device.precision / device.channels_last for this device (auto: bf16 + channels_last on CUDA)."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    elif precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"device.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                        "use device.precision=fp16 or fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    return Amp(precision, dtype, scaler, torch.channels_last if channels_last else torch.contiguous_format)


def compile_for_stage(model: nn.Module, cfg: DeviceConfig) -> nn.Module:
    """torch.compile afresh for a stage: guards do not track requires_grad changes (pytorch#139476),
    so a graph compiled while a layer was frozen would keep skipping its gradients."""
    torch._dynamo.reset()
    return torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                         backend=cfg.compile_backend)


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); exit 1."""

    exit_code = 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    """device.name -> torch.device; auto picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device.name={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer over exactly the given (trainable) parameters; fused kernels on CUDA by default."""
    params = list(params)
    on_cuda = bool(params) and params[0].is_cuda
    fused = cfg.fused if cfg.fused is not None else (True if on_cuda else None)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")  # validate() rejects it before this


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: Amp) -> tuple:
    """(logits, loss) under autocast; x is made channels_last when amp asks for it (a no-op if it is)."""
    x = x.contiguous(memory_format=amp.memory_format)
    with torch.autocast(x.device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
        logits = model(x)
        return logits, F.cross_entropy(logits, y)


def setup_device(model: nn.Module, cfg: DeviceConfig, device: torch.device) -> Amp:
    """Move the model (in the configured memory format), set cuDNN autotuning; the Amp for the steps."""
    amp = resolve_amp(cfg, device)
    model.to(device, memory_format=amp.memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    return amp


def backward_step(loss: torch.Tensor, opt: torch.optim.Optimizer, amp: Amp) -> None:
    """Backward and optimizer step, through the fp16 GradScaler when there is one."""
    opt.zero_grad(set_to_none=True)
    if amp.scaler is not None:
        amp.scaler.scale(loss).backward()
        amp.scaler.step(opt)
        amp.scaler.update()
    else:
        loss.backward()
        opt.step()


def train_one_epoch(model: nn.Module, loader, opt: torch.optim.Optimizer, device: torch.device,
                    on_step: Callable, every_n_steps: int, where: str, amp: Optional[Amp] = None) -> dict:
    """One pass over the loader. Loss/accuracy sums stay on the device; the host syncs every N steps."""
    amp = amp or Amp()
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, t0 = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, loss = forward_loss(model, x, y, amp)
        backward_step(loss, opt, amp)
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
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen, "n": seen,
            "time_s": time.perf_counter() - t0}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, amp: Optional[Amp] = None) -> dict:
    """Mean loss and accuracy over a loader, model in eval mode."""
    amp = amp or Amp()
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=amp.memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
    if n == 0:
        return {"loss": None, "acc": None, "n": 0}
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n": n}


def check_run_dir(run_dir: Path, files: tuple = RUN_FILES) -> None:
    """Refuse to write into a folder that already holds a run's results (never overwrite them)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    taken = [f for f in files + (".hydra",) if (run_dir / f).exists()]
    if taken:
        raise UserError(f"run dir {run_dir} already holds a run ({', '.join(taken)}); "
                        "choose another with hydra.run.dir=PATH")
    probe = run_dir / ".write_test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run dir {run_dir} is not writable ({e.strerror}); choose another with hydra.run.dir=PATH")


def start_run(cfg: Config, run_dir: Path, record: Optional[dict], required: tuple = RUN_FILES) -> tuple:
    """Everything that can fail fast, before any data is read: (stages, device, model, reporter).

    Only after the run dir is known to be free is anything written into it (the config record in .hydra/).
    """
    stages = resolve_stages(cfg.schedule.stages, cfg.stage, cfg.lr)
    device = resolve_device(cfg.device.name)
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise UserError(f"init_from: file not found: {cfg.init_from}")
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    check_trainable(model, cfg.schedule.stages)
    check_run_dir(run_dir, required)
    for name, text in (record or {}).items():
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / name).write_text(text)
    return stages, device, model, Reporter(run_dir, cfg.log.mode)


def run(cfg: Config, run_dir: Path, record: Optional[dict] = None) -> dict:
    """The staged run: validate, build, train each selected stage, evaluate, write the outputs."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    stages, device, model, rep = start_run(cfg, run_dir, record)
    try:
        return _run(cfg, run_dir, (record or {}).get("config.yaml", ""), stages, model, device, rep, t_start)
    except (UserError, TrainingError) as e:
        rep.log.print(f"error: {e}")  # the console gets it from the CLI; the log must say why the run stopped
        raise
    finally:
        rep.close()


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


def prepare_data(cfg: Config, device: torch.device, rep: Reporter) -> tuple:
    """(splits, loaders): the data split and loaded into the configured kind of loader."""
    splits = build_splits(cfg.data, cfg.seed, cfg.model.num_classes, warn=rep.warn)
    workers = min(cfg.data.num_workers, available_cpus())  # more workers than CPUs only thrash
    t0 = time.perf_counter()
    loaders = build_loaders(splits, cfg.data, cfg.augment, device, cfg.seed, workers, cfg.device.compile)
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
                     "first_epoch": st.first_epoch, "last_epoch": st.first_epoch + st.epochs - 1})
    return rows


def _run(cfg: Config, run_dir: Path, config_yaml: str, stages: list, model: nn.Module, device: torch.device,
         rep: Reporter, t_start: float) -> dict:
    if config_yaml:
        rep.config(config_yaml)
    splits, loaders = prepare_data(cfg, device, rep)
    load_weights(cfg, model, stages, rep)
    amp = setup_device(model, cfg.device, device)
    stage_rows = stage_table_rows(model, stages)
    rep.stage_table(stage_rows)

    best_val, last_val, epochs_run = None, None, 0
    for st in stages:
        params = apply_stage(model, st.trainable, cfg.schedule.freeze_bn)
        opt = build_optimizer(params, cfg.optim, st.lr)
        step_model = compile_for_stage(model, cfg.device) if cfg.device.compile else model
        rep.banner(f"stage {st.index}/{len(cfg.schedule.stages)} '{st.name}': {st.epochs} epoch(s), "
                   f"lr {st.lr:.2e}, training {', '.join(st.trainable)}")
        for e in range(st.epochs):
            epoch = st.first_epoch + e
            where = f"epoch {epoch} ({st.name})"
            with rep.progress(len(loaders.train), where) as on_step:
                tr = train_one_epoch(step_model, loaders.train, opt, device, on_step, cfg.log.every_n_steps, where,
                                     amp)
            va = evaluate(model, loaders.val, device, amp)
            epochs_run += 1
            last_val = va["acc"]
            if va["acc"] is not None and (best_val is None or va["acc"] > best_val):
                best_val = va["acc"]
            rep.epoch({"epoch": epoch, "stage": st.index, "stage_name": st.name, "lr": st.lr,
                       "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                       "val_acc": va["acc"], "epoch_time_s": round(tr["time_s"], 4),
                       "train_images_per_s": round(tr["n"] / tr["time_s"], 2)})

    test = evaluate(model, loaders.test, device, amp) if loaders.test is not None else None
    atomic_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, run_dir / "model.pt")
    summary = {"final_val_acc": last_val, "best_val_acc": best_val,
               "test_acc": test["acc"] if test else None, "test_loss": test["loss"] if test else None,
               "epochs_run": epochs_run, "wall_time_s": round(time.perf_counter() - t_start, 3),
               "stages": [{k: r[k] for k in ("name", "epochs", "lr", "trainable", "trainable_params")}
                          for r in stage_rows],
               "device": str(device), "loader": loaders.kind, "precision": amp.name,
               "classes": splits.classes, "config": dataclasses.asdict(cfg)}
    rep.summary(summary)
    return summary
