"""The lr range test (Smith 2017, "Cyclical Learning Rates", sec. 3.3; fastai's lr_find): one optimizer step
per lr on an exponential sweep, the loss smoothed, and the suggested lr. task=lr_find runs it on its own;
a stage with `lr: null` (schedule=auto) runs it at its start (training/auto_run.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from cbam_train.config.errors import UserError
from cbam_train.config.schema import Config, LrFindConfig
from cbam_train.training.device import Amp
from cbam_train.training.engine import accumulate, forward_loss, optimizer_step

SKIP_START = 0.1  # the suggestion ignores the first 10% of the planned steps, as fastai's do
# A fall of the fitted loss smaller than FLAT_FALL standard errors of a window's level is noise, not a descent:
# the lowest of the ~n/w nearly independent window levels lies 2-2.5 of them below their mean by chance alone, and
# the level it is compared with has its own. The flat stages of a pretrained network fell by 1.4-4.1 (fresh
# heads by 8.7 and 9.9) in benchmarks/auto_schedule.py's runs (docs/RESULTS.md). The flat's edge: a rise past
# EDGE_RISE of them.
FLAT_FALL = 6.0
EDGE_RISE = 3.0
WINDOW = 1 / 6  # the suggestion's line fits span a sixth of the planned steps (17 of 100): one odd batch moves
# their slope little, and 17 steps of the default sweep are 1.2 decades of lr, narrower than a loss's fall


def lr_schedule(min_lr: float, max_lr: float, steps: int) -> list:
    """lr_i = min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i = 0..steps-1: min_lr first, max_lr last."""
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def set_stage_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the stage's lr: each param group gets lr x its lr_mult (schedule.param_groups), so ratios hold."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def endless(loader: Iterable) -> Iterator:
    """The loader's batches, pass after pass (each pass a new order and new augmentation draws)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("lr_find: the training loader yielded no batches; lower data.batch_size")


@dataclass
class SweepSetup:
    """How the sweep steps: where, in what precision, how it smooths the loss and when it stops."""

    device: torch.device
    amp: Amp = field(default_factory=Amp)
    smooth: float = 0.9  # EMA factor (lr_find.smooth)
    diverge_factor: float = 4.0  # lr_find.diverge_factor
    label_smoothing: float = 0.0  # as training's loss (train.label_smoothing)
    accumulate_steps: int = 1  # batches per optimizer step, as training takes them (train.accumulate_steps)
    grad_clip_norm: Optional[float] = None  # as training clips (train.grad_clip_norm)
    on_step: Callable[[int, float, float, float], None] = lambda step, lr, loss, smoothed: None


@dataclass
class SweepResult:
    """One value per step taken: the stage lr, the batch's loss before its update, the smoothed loss."""

    lrs: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # None where the loss was not finite (then the sweep stopped)
    smoothed: list = field(default_factory=list)
    stop: Optional[dict] = None  # {"step" (1-based), "lr", "reason": diverged | non-finite, ...}; None: all steps


def range_test(model: nn.Module, batches: Iterator, optimizer: torch.optim.Optimizer, lrs: Sequence[float],
               setup: SweepSetup) -> SweepResult:
    """One optimizer step per lr, on accumulate_steps batches and clipped as training steps: the loss is
    measured before the update it drives (as fastai records it), smoothed by a bias-corrected EMA; stop once
    that exceeds diverge_factor x its best so far."""
    model.train()
    out, avg, best = SweepResult(), 0.0, math.inf
    k = setup.accumulate_steps
    optimizer.zero_grad(set_to_none=True)
    for i, lr in enumerate(lrs):
        set_stage_lr(optimizer, lr)
        total = 0.0
        for _ in range(k):  # the step's gradient: the mean over its k batches, as train_one_epoch takes it
            x, y = next(batches)
            x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
            _, loss = forward_loss(model, x, y, setup.amp, setup.label_smoothing)
            accumulate(loss / k, setup.amp)
            total += loss.item()  # one host sync per batch: the stop decision needs the number
        value = total / k
        out.lrs.append(lr)
        if not math.isfinite(value):
            out.losses.append(None)
            out.smoothed.append(None)
            out.stop = {"step": i + 1, "lr": lr, "reason": "non-finite", "loss": str(value)}
            break
        avg = setup.smooth * avg + (1 - setup.smooth) * value
        smoothed = avg / (1 - setup.smooth ** (i + 1))  # the EMA starts at 0: divide out its weight so far
        best = min(best, smoothed)
        out.losses.append(value)
        out.smoothed.append(smoothed)
        setup.on_step(i + 1, lr, value, smoothed)
        if smoothed > setup.diverge_factor * best:
            out.stop = {"step": i + 1, "lr": lr, "reason": "diverged", "smoothed_loss": smoothed,
                        "best_smoothed_loss": best, "diverge_factor": setup.diverge_factor}
            break
        optimizer_step(optimizer, setup.amp, setup.grad_clip_norm)
    return out


def sweep_stage(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable, device: torch.device,
                amp: Amp, on_step: Callable[[int, float, float, float], None]) -> SweepResult:
    """The range test of an opened stage with the run's settings (lr_find.*, train.*): task=lr_find's and each
    schedule=auto stage's; the training loader goes round again when the sweep is longer than an epoch."""
    f = cfg.lr_find
    setup = SweepSetup(device, amp, f.smooth, f.diverge_factor, cfg.train.label_smoothing, cfg.train.accumulate_steps,
                       cfg.train.grad_clip_norm, on_step)
    return range_test(model, endless(loader), optimizer, lr_schedule(f.min_lr, f.max_lr, f.steps), setup)


def local_lines(loss: np.ndarray, log_lr: np.ndarray, half: int) -> tuple:
    """(level, slope) of the least-squares line through the loss against log10(lr) over each centred window of
    2 * half + 1 steps (a Savitzky-Golay filter of order 1); NaN where a window does not fit."""
    level, slope = np.full(len(loss), np.nan), np.full(len(loss), np.nan)
    for i in range(half, len(loss) - half):
        window = slice(i - half, i + half + 1)
        slope[i], level[i] = np.polyfit(log_lr[window] - log_lr[i], loss[window], 1)
    return level, slope


def suggest(lrs: Sequence[float], losses: Sequence[Optional[float]], planned_steps: int) -> dict:
    """The lr where the loss falls fastest per decade of lr (fastai's `steep`), searched after the first 10% of
    the planned steps and before the loss's minimum (out of the divergence tail). Slope and minimum come from a
    line fitted to each window of steps, not from differencing the EMA: the EMA's slope at step t is
    (1 - smooth) x (loss_t - EMA_{t-1}), so its steepest point is the one batch furthest below the average.
    With no descent to search: the lr at the minimum / 10 (fastai's `minimum`). With a fall within the noise (a
    trained network's next stage: flat until it diverges, its minimum anywhere in the flat): the lr where the
    loss starts to rise / 10, the same rule with the flat's edge for its minimum."""
    n = next((i for i, v in enumerate(losses) if v is None), len(losses))  # the finite points
    loss, log_lr = np.array(losses[:n], dtype=float), np.log10(np.array(lrs[:n], dtype=float))
    half = min(max(2, round(planned_steps * WINDOW / 2)), (n - 1) // 2)
    if half < 1:  # one or two steps: nothing to fit
        i_min = int(np.argmin(loss))
        return _min_div_10(lrs, i_min, float(loss[i_min]), [0, n - 1], "the sweep stopped after "
                           f"{n} step(s)")
    level, slope = local_lines(loss, log_lr, half)
    start = max(int(planned_steps * SKIP_START), half)
    start = start if start < n - half else half  # stopped early: search what there is
    i_min = start + int(np.nanargmin(level[start:n - half]))
    fall, se = float(np.max(level[start:i_min + 1]) - level[i_min]), level_error(loss, level, half)
    noisy = se > 1e-9 * max(1.0, abs(float(level[i_min])))  # above float64's rounding of an exact curve's fit
    if noisy and fall < FLAT_FALL * se:  # noise, wherever its minimum fell (at the search's start too)
        return _flat_edge(lrs, level, i_min, n - half, fall, se)
    if i_min - start < 2:
        return _min_div_10(lrs, i_min, float(level[i_min]), [start, n - half - 1],
                           f"no descent to search: the fitted loss is lowest at step {i_min + 1}, where the search "
                           f"starts")
    i = start + int(np.argmin(slope[start:i_min]))
    return {"lr": float(lrs[i]), "method": "steepest_before_min", "index": i,
            "inputs": {"slope": "least-squares line through the loss against log10(lr) over each window of steps",
                       "window_steps": 2 * half + 1, "searched": [start, i_min - 1],
                       "slope_per_decade": float(slope[i]), "level": float(level[i]),
                       "min_index": i_min, "min_lr": float(lrs[i_min]), "min_level": float(level[i_min]),
                       "fall": fall, "level_se": se}}


def level_error(loss: np.ndarray, level: np.ndarray, half: int) -> float:
    """The standard error of a window's fitted level: the steps' scatter about their lines (a robust standard
    deviation, 1.4826 x the median absolute deviation, so the divergence tail's spikes do not count) / sqrt(window)."""
    fitted = ~np.isnan(level)
    residual = loss[fitted] - level[fitted]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))) / math.sqrt(2 * half + 1))


def _flat_edge(lrs: Sequence[float], level: np.ndarray, i_min: int, end: int, fall: float, se: float) -> dict:
    limit = level[i_min] + EDGE_RISE * se
    edge = max(i for i in range(i_min, end) if level[i] <= limit)  # the last window still within the flat
    return {"lr": float(lrs[edge]) / 10, "method": "flat_edge_div_10", "index": edge,
            "inputs": {"why": f"the fitted loss fell by {fall:.3g}, under {FLAT_FALL:g} standard errors of a window's "
                              f"level ({se:.2g})", "fall": fall, "level_se": se, "edge_index": edge,
                       "edge_lr": float(lrs[edge]), "edge_level": float(limit), "min_index": i_min,
                       "min_lr": float(lrs[i_min]), "min_level": float(level[i_min])}}


def _min_div_10(lrs: Sequence[float], i_min: int, loss: float, searched: list, why: str) -> dict:
    return {"lr": float(lrs[i_min]) / 10, "method": "min_div_10", "index": i_min,
            "inputs": {"why": why, "searched": searched, "min_index": i_min, "min_lr": float(lrs[i_min]),
                       "min_level": loss}}


def sweep_record(result: SweepResult, settings: LrFindConfig, stage: Any, groups: list) -> dict:
    """What lr_find.json (and a found stage lr's lr_find/stage<k>-<name>.json) holds of a sweep: the stage, its
    lr groups, the settings, every step, how it ended and the suggestion. Raises UserError when the loss was not
    finite even at the first step (nothing to suggest from)."""
    if not any(s is not None for s in result.smoothed):
        raise UserError(f"lr range test of stage '{stage.name}': the loss was not finite at the first step (lr "
                        f"{settings.min_lr:.1e}); lower lr_find.min_lr or check the data")
    return {"stage": {"index": stage.index, "name": stage.name, "lr": stage.lr, "trainable": list(stage.trainable)},
            "lr_groups": [{"lr_mult": g["lr_mult"], "modules": g["modules"]} for g in groups],
            "settings": asdict(settings), "steps_run": len(result.lrs), "stopped_early": result.stop is not None,
            "stop": result.stop, "lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed,
            "suggestion": suggest(result.lrs, result.losses, settings.steps)}


def describe_suggestion(suggestion: dict) -> str:
    """How the suggestion was chosen, for the console."""
    s = suggestion
    if s["method"] == "steepest_before_min":
        return (f"the loss's steepest descent ({s['inputs']['slope_per_decade']:.3g} per decade of lr, a line fitted "
                f"over {s['inputs']['window_steps']} steps), before its minimum at lr {s['inputs']['min_lr']:.1e}")
    if s["method"] == "flat_edge_div_10":
        return (f"the lr where the loss starts to rise, {s['inputs']['edge_lr']:.1e}, / 10 (no measurable descent: "
                f"{s['inputs']['why']})")
    return f"the lr at the loss's minimum, {s['inputs']['min_lr']:.1e}, / 10 ({s['inputs']['why']})"
