"""The step machinery shared by training, evaluation and the benchmark: device and precision setup,
the optimizer, one training epoch (resumable mid-epoch) and evaluation."""

from __future__ import annotations

import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbam_train.config import DeviceConfig, OptimConfig, UserError


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


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: Amp, label_smoothing: float = 0.0) -> tuple:
    """(logits, loss) under autocast; x is made channels_last when amp asks for it (a no-op if it is)."""
    x = x.contiguous(memory_format=amp.memory_format)
    with torch.autocast(x.device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
        logits = model(x)
        return logits, F.cross_entropy(logits, y, label_smoothing=label_smoothing)


@dataclass
class StepExtras:
    """What else happens at each training step besides forward, backward and the optimizer step."""

    label_smoothing: float = 0.0
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None  # stepped after every optimizer step
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None  # updated after every optimizer step
    any_rank: Optional[Callable[[bool], bool]] = None  # data-parallel: a decision every rank must share


def build_ema(model: nn.Module, decay: Optional[float]) -> Optional[torch.optim.swa_utils.AveragedModel]:
    """An exponential moving average of the weights and buffers (BatchNorm statistics), or None."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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


class NonFiniteLoss(TrainingError):
    """The loss became NaN or inf; `step` is the first batch (1-based) where it did."""

    def __init__(self, where: str, step: int) -> None:
        super().__init__(f"non-finite loss at {where} step {step}")
        self.where, self.step = where, step


@dataclass
class EpochState:
    """How far an epoch got and its running sums (kept on the device); a mid-epoch checkpoint saves it."""

    step: int = 0  # batches done
    loss_sum: Optional[torch.Tensor] = None  # sum of per-batch mean loss x batch size
    correct: Optional[torch.Tensor] = None
    seen: int = 0  # images in the sums
    skipped: int = 0  # batches skipped for a non-finite loss (train.nan_policy=skip_batch)

    def to(self, device: torch.device) -> "EpochState":
        z = torch.zeros((), device=device)
        self.loss_sum = z.clone() if self.loss_sum is None else self.loss_sum.to(device)
        self.correct = z.long() if self.correct is None else self.correct.to(device)
        return self

    def to_dict(self) -> dict:
        return {"step": self.step, "loss_sum": self.loss_sum.detach().cpu(), "correct": self.correct.detach().cpu(),
                "seen": self.seen, "skipped": self.skipped}


def train_one_epoch(model: nn.Module, loader, opt: torch.optim.Optimizer, device: torch.device,
                    on_step: Callable, every_n_steps: int, where: str, amp: Optional[Amp] = None,
                    state: Optional[EpochState] = None, nan_policy: str = "stop",
                    should_stop: Callable[[], bool] = lambda: False,
                    on_checkpoint: Optional[Callable[[EpochState], None]] = None, checkpoint_every: int = 0,
                    extras: Optional[StepExtras] = None) -> dict:
    """One pass over the loader, or the rest of one: `state` carries a resumed epoch's step and sums (the
    loader must then skip `state.step` batches itself). Sums stay on the device; the host syncs every N steps.

    A non-finite loss raises NonFiniteLoss (nan_policy=stop, naming its first step; checked at each sync) or
    skips that batch's update (skip_batch, one sync per step). `should_stop()` is asked after every step: a
    True ends the epoch early with "stopped": True. `on_checkpoint(state)` runs every `checkpoint_every` steps.
    """
    amp, extras = amp or Amp(), extras or StepExtras()
    st = (state or EpochState()).to(device)
    model.train()
    bad_step = torch.zeros((), device=device, dtype=torch.long)  # first step with a non-finite loss; 0: none
    first, seen0, t0 = st.step, st.seen, time.perf_counter()
    stopped = False

    def check_finite() -> None:
        if nan_policy != "stop":
            return
        first_bad = int(bad_step.item())
        if extras.any_rank is not None and extras.any_rank(first_bad > 0) and not first_bad:
            raise NonFiniteLoss(f"{where} (on another process)", st.step)
        if first_bad:
            raise NonFiniteLoss(where, first_bad)

    for step, (x, y) in enumerate(loader, first + 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, loss = forward_loss(model, x, y, amp, extras.label_smoothing)
        st.step = step
        if nan_policy == "skip_batch":
            bad = not torch.isfinite(loss).item()
            if extras.any_rank is not None:
                bad = extras.any_rank(bad)  # all ranks skip together, or DDP's gradient all-reduce would hang
            if bad:
                st.skipped += 1
                on_step(step)
                continue
        else:
            bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        backward_step(loss, opt, amp)
        if extras.scheduler is not None:
            with warnings.catch_warnings():  # fp16: the GradScaler skips steps with inf gradients on purpose
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                extras.scheduler.step()
        if extras.ema is not None:
            extras.ema.update_parameters(model)
        st.loss_sum += loss.detach() * y.shape[0]
        st.correct += (logits.argmax(1) == y).sum()
        st.seen += y.shape[0]
        if step % every_n_steps == 0 or step == len(loader):
            check_finite()
            seen = max(st.seen, 1)
            on_step(step, {"loss": st.loss_sum.item() / seen, "acc": st.correct.item() / seen,
                           "img_per_s": (st.seen - seen0) / (time.perf_counter() - t0)})
        else:
            on_step(step)
        if checkpoint_every and on_checkpoint is not None and step % checkpoint_every == 0 and step < len(loader):
            check_finite()
            on_checkpoint(st)
        if should_stop() and step < len(loader):
            stopped = True
            break
    check_finite()
    if st.seen == 0 and st.skipped:
        raise TrainingError(f"every batch of {where} had a non-finite loss ({st.skipped} skipped); lower the "
                            "learning rate (lr=...) or check the data")
    seen = max(st.seen, 1)
    return {"loss": st.loss_sum.item() / seen, "acc": st.correct.item() / seen, "n": st.seen,
            "time_s": time.perf_counter() - t0, "skipped": st.skipped, "stopped": stopped, "state": st}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, amp: Optional[Amp] = None,
             num_classes: Optional[int] = None, flip_tta: bool = False) -> dict:
    """Mean loss and accuracy over a loader, model in eval mode; with num_classes also the confusion
    matrix (rows: true class, columns: predicted) as nested lists. flip_tta averages the logits of each
    image and its horizontal mirror."""
    amp = amp or Amp()
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes or 1, num_classes or 1, device=device, dtype=torch.long)
    n = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=amp.memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
            logits = model(x).float()
            if flip_tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == y).sum()
        if num_classes:
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view_as(confusion)
        n += y.shape[0]
    if n == 0:
        return {"loss": None, "acc": None, "n": 0}
    out = {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n": n}
    if num_classes:
        out["confusion"] = confusion.cpu().tolist()
    return out
