"""One training epoch (resumable mid-epoch) and evaluation: plain functions over a model and a loader,
shared by training and the benchmark. Device and precision live in device.py, the optimizer in optim.py."""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cbam_train.augment.mixing import BatchMix
from cbam_train.config.errors import NonFiniteLoss, TrainingError
from cbam_train.state.run_state import EpochState
from cbam_train.training.device import Amp
from cbam_train.training.optim import stage_lr


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: Amp, label_smoothing: float = 0.0) -> tuple:
    """(logits, loss) under autocast; x is made channels_last when amp asks for it (a no-op if it is).
    y: class indices (B,), or soft targets (B, classes) from mixing, which label smoothing smooths in turn."""
    x = x.contiguous(memory_format=amp.memory_format)
    with torch.autocast(x.device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
        logits = model(x)
        return logits, F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def backward_step(loss: torch.Tensor, opt: torch.optim.Optimizer, amp: Amp) -> None:
    """Backward and optimizer step, through the fp16 GradScaler when there is one."""
    opt.zero_grad(set_to_none=True)
    accumulate(loss, amp)
    optimizer_step(opt, amp)


def accumulate(loss: torch.Tensor, amp: Amp) -> None:
    """Backward of one (micro-)batch's loss: its gradients add to those already in .grad."""
    (amp.scaler.scale(loss) if amp.scaler is not None else loss).backward()


def optimizer_step(opt: torch.optim.Optimizer, amp: Amp, clip_norm: Optional[float] = None) -> Optional[torch.Tensor]:
    """One optimizer step over the accumulated gradients, then clear them. With clip_norm, the gradients'
    total norm is clipped to it first (unscaled first under fp16) and the pre-clip norm returned (on the device)."""
    norm = None
    if clip_norm is not None:
        if amp.scaler is not None:
            amp.scaler.unscale_(opt)  # clip the true gradients, not the loss-scaled ones
        norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_norm)
    if amp.scaler is not None:
        amp.scaler.step(opt)  # skips the step if the gradients hold an inf or NaN (and lowers the scale)
        amp.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def micro_batch_share(step: int, n_batches: int, accumulate_steps: int) -> int:
    """How many batches the optimizer step that 1-based batch `step` belongs to averages: accumulate_steps,
    fewer for the epoch's last, short group."""
    start = (step - 1) // accumulate_steps * accumulate_steps
    return min(accumulate_steps, n_batches - start)


def optimizer_steps_per_epoch(n_batches: int, accumulate_steps: int) -> int:
    """What the lr schedule counts: one per accumulate_steps batches, the epoch's last short group included."""
    return -(-n_batches // accumulate_steps)


def _no_progress(step: int, stats: Optional[dict] = None) -> None:
    pass


@dataclass
class EpochSetup:
    """How train_one_epoch runs: on what, how often the host syncs, and what else happens at each step."""

    device: torch.device
    amp: Amp = field(default_factory=Amp)
    where: str = "epoch"  # for messages: "epoch 3 (high)"
    on_step: Callable = _no_progress  # on_step(step), and on_step(step, stats) at a sync
    every_n_steps: int = 10**9  # host syncs (progress stats, the non-finite check); the last step always syncs
    nan_policy: str = "stop"  # or "skip_batch" (train.nan_policy)
    label_smoothing: float = 0.0
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None  # stepped after every optimizer step
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None  # updated after every optimizer step
    should_stop: Callable[[], bool] = lambda: False  # asked after every step
    on_checkpoint: Optional[Callable[["EpochState"], None]] = None  # a mid-epoch checkpoint ...
    checkpoint_every: int = 0  # ... every this many steps (0: none)
    any_rank: Optional[Callable[[bool], bool]] = None  # data-parallel: a decision every rank must share
    accumulate_steps: int = 1  # batches per optimizer step (train.accumulate_steps)
    grad_clip_norm: Optional[float] = None  # clip the gradients' total norm to this before each step
    mix: Optional[BatchMix] = None  # augment.mix: MixUp / CutMix of each batch, on the device


@dataclass
class EpochResult:
    """A training epoch's mean loss and accuracy (this rank's until distributed.reduce_epoch), counts and time."""

    loss: float
    acc: float
    n: int  # images trained on
    time_s: float
    skipped: int  # batches skipped for a non-finite loss
    stopped: bool  # should_stop() ended the epoch early
    state: EpochState  # where it got: what a checkpoint of a stopped epoch saves
    clipped: int = 0  # optimizer steps whose gradients were clipped
    lr: Optional[float] = None  # the stage's lr (optim.stage_lr) at the epoch's last optimizer step


def train_one_epoch(model: nn.Module, loader, opt: torch.optim.Optimizer, setup: EpochSetup,
                    state: Optional[EpochState] = None) -> EpochResult:
    """One pass over the loader, or the rest of one: `state` carries a resumed epoch's step and sums (the
    loader must then skip `state.step` batches itself). Sums stay on the device; the host syncs every N steps.

    A non-finite loss raises NonFiniteLoss (nan_policy=stop, naming its first step; checked at each sync) or
    skips that batch's update (skip_batch, one sync per step). A True from `setup.should_stop()` ends the epoch
    early (`stopped`). `setup.on_checkpoint(state)` runs every `setup.checkpoint_every` steps. With
    `setup.accumulate_steps` = k the optimizer steps once per k batches on the mean of their gradients (the
    epoch's last group may be shorter); checkpoints and stops fall only between optimizer steps.
    """
    device, amp, where, on_step = setup.device, setup.amp, setup.where, setup.on_step
    progress = (state or EpochState()).to(device)
    model.train()
    bad_step = torch.zeros((), device=device, dtype=torch.long)  # first step with a non-finite loss; 0: none
    first, seen0, t0 = progress.step, progress.seen, time.perf_counter()
    stopped = False
    last_lr = None

    def raise_if_loss_was_non_finite() -> None:
        if setup.nan_policy != "stop":
            return
        first_bad = int(bad_step.item())
        if setup.any_rank is not None and setup.any_rank(first_bad > 0) and not first_bad:
            raise NonFiniteLoss(f"{where} (on another process)", progress.step)
        if first_bad:
            raise NonFiniteLoss(where, first_bad)

    n_batches, k = len(loader), setup.accumulate_steps
    opt.zero_grad(set_to_none=True)
    if setup.mix is not None:
        setup.mix.skip(first)  # a resumed epoch: what the batches already done drew
    for step, (x, y) in enumerate(loader, first + 1):
        boundary = step % k == 0 or step == n_batches  # this batch completes an optimizer step
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        target = y
        if setup.mix is not None:  # soft targets; y becomes each image's dominant label, what train acc counts
            x, target, y = setup.mix(x, y)
        with _grad_sync(model, boundary):
            logits, loss = forward_loss(model, x, target, amp, setup.label_smoothing)
            progress.step = step
            if setup.nan_policy == "skip_batch":  # (validation refuses it with accumulate_steps > 1)
                if _loss_not_finite_anywhere(loss, setup):
                    progress.skipped += 1
                    on_step(step)
                    continue
            else:
                bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
            accumulate(loss / micro_batch_share(step, n_batches, k), amp)  # the step's gradient: the groups' mean
        if boundary:
            last_lr = _step(opt, setup, progress, model)
        progress.loss_sum += loss.detach() * y.shape[0]
        progress.correct += (logits.argmax(1) == y).sum()
        progress.seen += y.shape[0]
        if step % setup.every_n_steps == 0 or step == n_batches:
            raise_if_loss_was_non_finite()
            seen = max(progress.seen, 1)
            on_step(step, {"loss": progress.loss_sum.item() / seen, "acc": progress.correct.item() / seen,
                           "img_per_s": (progress.seen - seen0) / (time.perf_counter() - t0)})
        else:
            on_step(step)
        if not boundary or step == n_batches:  # checkpoints and stops only between optimizer steps: no
            continue  # half-accumulated gradients to save
        if setup.checkpoint_every and setup.on_checkpoint is not None and step % setup.checkpoint_every == 0:
            raise_if_loss_was_non_finite()
            setup.on_checkpoint(progress)
        if setup.should_stop():
            stopped = True
            break
    raise_if_loss_was_non_finite()
    if progress.seen == 0 and progress.skipped:
        raise TrainingError(f"every batch of {where} had a non-finite loss ({progress.skipped} skipped); lower the "
                            "learning rate (lr=...) or check the data")
    seen = max(progress.seen, 1)
    # to(device) at the start set the sums
    assert progress.loss_sum is not None and progress.correct is not None and progress.clipped is not None
    return EpochResult(loss=progress.loss_sum.item() / seen, acc=progress.correct.item() / seen, n=progress.seen,
                       time_s=time.perf_counter() - t0, skipped=progress.skipped, stopped=stopped, state=progress,
                       clipped=int(progress.clipped.item()), lr=last_lr)


def _loss_not_finite_anywhere(loss: torch.Tensor, setup: EpochSetup) -> bool:
    """nan_policy=skip_batch: whether any rank's loss is not finite (a host sync). All ranks skip together, or
    DDP's gradient all-reduce would hang."""
    bad = not torch.isfinite(loss).item()
    return setup.any_rank(bad) if setup.any_rank is not None else bad


def _grad_sync(model: nn.Module, boundary: bool):
    """DDP: all-reduce the gradients only on the batch that completes an optimizer step (no_sync before it)."""
    if not boundary and hasattr(model, "no_sync"):
        # torch types a Module's other attributes as Tensor | Module; DDP's no_sync is a method
        return model.no_sync()  # type: ignore[operator]
    return contextlib.nullcontext()


def _step(opt: torch.optim.Optimizer, setup: EpochSetup, progress: EpochState, model: nn.Module) -> float:
    """The optimizer step (clipping counted), then the lr schedule and the EMA; the lr the step used."""
    norm = optimizer_step(opt, setup.amp, setup.grad_clip_norm)
    if norm is not None:
        # a norm comes back only when clipping is on; the epoch's to() has set the count
        assert setup.grad_clip_norm is not None and progress.clipped is not None
        progress.clipped += (torch.isfinite(norm) & (norm > setup.grad_clip_norm)).long()
    lr = stage_lr(opt)
    if setup.scheduler is not None:
        with warnings.catch_warnings():  # fp16: the GradScaler skips steps with inf gradients on purpose
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            setup.scheduler.step()
    if setup.ema is not None:
        setup.ema.update_parameters(model)
    return lr


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, amp: Optional[Amp] = None,
             num_classes: Optional[int] = None, flip_tta: bool = False, per_sample: bool = False) -> dict:
    """Mean loss and accuracy over a loader, model in eval mode; with num_classes also the confusion
    matrix (rows: true class, columns: predicted) as nested lists. flip_tta averages the logits of each
    image and its horizontal mirror. per_sample adds "samples": each image's loss, prediction and its
    probability (CPU tensors, in loader order)."""
    amp = amp or Amp()
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes or 1, num_classes or 1, device=device, dtype=torch.long)
    n = 0
    samples: list = []
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=amp.memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
            logits = model(x).float()
            if flip_tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.argmax(1)
        if per_sample:  # its own pass: the summed loss above stays bit-identical to training's val/test loss
            samples.append((F.cross_entropy(logits, y, reduction="none"), pred,
                            logits.softmax(1).gather(1, pred[:, None])[:, 0]))
        correct += (pred == y).sum()
        if num_classes:
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view_as(confusion)
        n += y.shape[0]
    if n == 0:
        return {"loss": None, "acc": None, "n": 0}
    out: dict[str, Any] = {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n": n}
    if num_classes:
        out["confusion"] = confusion.cpu().tolist()
    if per_sample:
        out["samples"] = {k: torch.cat([s[i] for s in samples]).cpu() for i, k in enumerate(("loss", "pred", "prob"))}
    return out
