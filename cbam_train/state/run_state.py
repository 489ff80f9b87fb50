"""What a checkpoint holds, and when each part comes back: the only code that knows the file's keys.

A checkpoint (checkpoints/*.pt: format "cbam-train-checkpoint", checkpoint.CHECKPOINT_VERSION, both
checked by checkpoint.load_checkpoint) holds, and a resume puts back:

  config, data, world        the run's settings, its data (classes, sizes, mean/std), the process count:
                             checked first, before any weights move (resume.check_resume)
  overrides                  the command line: cli.py re-creates the config from it (overrides.py)
  model                      weights and buffers, torchvision's names: before the loop (restore_model)
  scaler, ema                fp16 GradScaler, EMA weights (None when off): before the loop (restore_scaler_and_ema)
  rng, rng_ranks             every random state at the next epoch's start: before the loop (restore_position)
  step, partial,             a mid-epoch checkpoint: batches done and running sums. Before the loop the loader
  partial_ranks              is told to skip `step` batches; the sums are staged for the first epoch
  stage, stage_name,         the stage it was taken in and that stage's optimizer and lr-schedule state:
  optimizer, scheduler       staged, loaded when the first stage opens if it is that stage (restore_stage)
  epoch, history,            the last finished epoch, the metrics rows, the best val accuracy: the loop
  best_val_acc               continues from them (the RunState's own fields); which stages are done, and where
                             the next epoch starts, follow from the rows' stage_name and stage_end
  found_lr                   each stage whose lr a range test found (lr: null, schedule=auto): {stage name: the lr,
                             the suggestion, the range, the picture}; a resume takes the lr from here, never
                             re-running a finished test (the RunState's own field; {} in older checkpoints)
  stage_best                 until_plateau with restore_best: the open stage's best weights so far (model,
                             EMA) and their epoch; None otherwise (the RunState's own field)

`rng_ranks` / `partial_ranks` hold every rank's (data-parallel runs); `rng` / `partial` are rank 0's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from cbam_train.config.errors import ConfigError
from cbam_train.state.rng import restore_rng
from cbam_train.state.weights import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    cpu_snapshot,
    load_strict,
    strip_wrapper_prefixes,
)


@dataclass
class EpochState:
    """How far an epoch got and its running sums (kept on the device); a mid-epoch checkpoint saves it."""

    step: int = 0  # batches done
    loss_sum: Optional[torch.Tensor] = None  # sum of per-batch mean loss x batch size
    correct: Optional[torch.Tensor] = None
    seen: int = 0  # images in the sums
    skipped: int = 0  # batches skipped for a non-finite loss (train.nan_policy=skip_batch)
    clipped: Optional[torch.Tensor] = None  # optimizer steps whose gradient norm exceeded train.grad_clip_norm

    def to(self, device: torch.device) -> "EpochState":
        z = torch.zeros((), device=device)
        self.loss_sum = z.clone() if self.loss_sum is None else self.loss_sum.to(device)
        self.correct = z.long() if self.correct is None else self.correct.to(device)
        self.clipped = z.long() if self.clipped is None else self.clipped.to(device)
        return self

    def to_dict(self) -> dict:
        # what is saved is the loop's state after to(), or one loaded from a checkpoint: the sums are tensors
        assert self.loss_sum is not None and self.correct is not None and self.clipped is not None
        return {"step": self.step, "loss_sum": self.loss_sum.detach().cpu(), "correct": self.correct.detach().cpu(),
                "seen": self.seen, "skipped": self.skipped, "clipped": self.clipped.detach().cpu()}


@dataclass
class RunParts:
    """The live objects and fixed facts every checkpoint of a run records."""

    model: nn.Module
    scaler: Any  # torch.amp.GradScaler or None
    ema: Any  # torch.optim.swa_utils.AveragedModel or None
    config: dict  # dataclasses.asdict(cfg)
    overrides: list
    data: dict  # classes, mean, std, n_train, n_val
    world: int = 1


@dataclass
class RunState:
    """A run's progress (updated after every epoch) and, on resume, its checkpoint's parts still to put back."""

    epoch: int = 0  # last finished epoch
    history: list = field(default_factory=list)  # metrics rows, one per finished epoch
    best_val_acc: Optional[float] = None
    checkpoint: Optional[dict] = None  # the checkpoint resumed from (None: a fresh run)
    stage_best: Optional[dict] = None  # {"stage_name", "epoch", "model", "ema"}: CPU copies (plateau.restore_best)
    found_lr: dict = field(default_factory=dict)  # stage name -> auto_run.find_lr's record (lr, suggestion, range)
    _staged_optimizer: Optional[dict] = None  # stage_name, optimizer, scheduler: for the first stage that opens
    _staged_partial: Optional[EpochState] = None  # a mid-epoch checkpoint's running sums, for the first epoch

    @classmethod
    def fresh(cls) -> "RunState":
        return cls()

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RunState":
        """The progress in a checkpoint read by checkpoint.load_checkpoint (format and version already checked)."""
        staged = {k: ckpt.get(k) for k in ("stage_name", "optimizer", "scheduler")}
        return cls(ckpt["epoch"], list(ckpt["history"]), ckpt["best_val_acc"], ckpt, ckpt.get("stage_best"),
                   dict(ckpt.get("found_lr") or {}), staged)

    def record(self, row: dict) -> bool:
        """A finished epoch's metrics row; True when its val_acc is a new best."""
        new_best = row["val_acc"] is not None and (self.best_val_acc is None or row["val_acc"] > self.best_val_acc)
        self.best_val_acc = row["val_acc"] if new_best else self.best_val_acc
        self.epoch = row["epoch"]
        self.history.append(row)
        return new_best

    # -- reading
    def stage_rows(self, name: str) -> list:
        """The metrics rows of one stage so far."""
        return [r for r in self.history if r["stage_name"] == name]

    def keep_stage_best(self, stage_name: str, epoch: int, model: nn.Module, ema: Any) -> None:
        """CPU copies of the weights (and EMA's) of a restore_best plateau stage's best epoch so far."""
        self.stage_best = {"stage_name": stage_name, "epoch": epoch, "model": cpu_snapshot(model.state_dict()),
                           "ema": cpu_snapshot(ema.state_dict()) if ema is not None else None}

    def take_stage_best(self, stage_name: str, last_epoch: int, model: nn.Module, ema: Any) -> Optional[int]:
        """At a stage's end: put its best epoch's weights back when that was not its last epoch; return that
        epoch (None: nothing restored). The copy is dropped either way."""
        best, self.stage_best = self.stage_best, None
        if best is None or best["stage_name"] != stage_name or best["epoch"] == last_epoch:
            return None
        model.load_state_dict(best["model"])
        if ema is not None and best["ema"] is not None:
            ema.load_state_dict(best["ema"])
        return best["epoch"]

    def stage_done(self, stage: Any) -> bool:
        """Whether a stage has ended: on a plateau, or after its `epochs` (which a resume may have raised)."""
        rows = self.stage_rows(stage.name)
        return bool(rows) and (rows[-1].get("stage_end") == "plateau" or len(rows) >= stage.epochs)

    def reopen_extended(self, stages: list) -> None:
        """A resume that raised a stage's `epochs` ("to train longer"): its last row no longer ends it, as in a
        run planned that long from the start."""
        for stage in stages:
            rows = self.stage_rows(stage.name)
            if rows and rows[-1].get("stage_end") == "epochs" and len(rows) < stage.epochs:
                rows[-1]["stage_end"] = None

    def next_epoch(self, stage: Any) -> int:
        """The global number of the next epoch: one after the last that ran, or the stage's planned first epoch
        in a run that has none yet (stage=2 counts from 6 in the seed schedule)."""
        return self.epoch + 1 if self.history else stage.first_epoch

    @property
    def step(self) -> int:
        """Batches of epoch `epoch + 1` done when the checkpoint was taken (0: at an epoch end)."""
        return self.checkpoint["step"] if self.checkpoint is not None else 0

    @property
    def stage_name(self) -> Optional[str]:
        return self.checkpoint["stage_name"] if self.checkpoint is not None else None

    @property
    def _resumed(self) -> dict:
        """The checkpoint, for the readers and restorers below: only a resumed run calls them."""
        assert self.checkpoint is not None, "a fresh run has no checkpoint to read"
        return self.checkpoint

    @property
    def saved_config(self) -> dict:
        return self._resumed["config"]

    @property
    def saved_data(self) -> dict:
        return self._resumed["data"]

    @property
    def saved_world(self) -> int:
        return self._resumed.get("world", 1)

    # -- restoring, in this order, before the loop
    def restore_model(self, model: nn.Module, source: str) -> None:
        load_strict(model, self._resumed["model"], source)

    def restore_scaler_and_ema(self, scaler: Any, ema: Any) -> None:
        """The fp16 loss scale and the EMA weights (after the EMA was built from the restored model)."""
        ckpt = self._resumed
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])

    def restore_position(self, generators: tuple, skip_batches: Callable[[int], None], rank: int) -> None:
        """This rank's random states, the batches a mid-epoch checkpoint had done (skipped) and its sums (staged)."""
        ckpt = self._resumed
        many = ckpt.get("world", 1) > 1  # each rank continues from its own random state and running sums
        restore_rng(ckpt["rng_ranks"][rank] if many else ckpt["rng"], generators)
        if ckpt["step"]:
            self._staged_partial = EpochState(**(ckpt["partial_ranks"][rank] if many else ckpt["partial"]))
            skip_batches(self._staged_partial.step)

    # -- staged parts, taken once
    def take_partial_epoch(self) -> Optional[EpochState]:
        """The running sums of a resumed mid-epoch checkpoint, for the first epoch that runs (then None)."""
        partial, self._staged_partial = self._staged_partial, None
        return partial

    def restore_stage(self, stage_name: str, optimizer: Any, scheduler: Any, source: str) -> None:
        """Into the first stage that opens: the checkpoint's optimizer and scheduler state, if it was taken in that
        stage (else the checkpoint ended its stage and this one starts fresh)."""
        staged, self._staged_optimizer = self._staged_optimizer, None
        if staged is None or staged["stage_name"] != stage_name:
            return
        try:
            optimizer.load_state_dict(staged["optimizer"])
            if scheduler is not None and staged.get("scheduler") is not None:
                scheduler.load_state_dict(staged["scheduler"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"resume: the optimizer state in {source} does not fit stage '{stage_name}' "
                              f"({e}); its trainable modules or optim.* changed") from None

    # -- writing
    def to_checkpoint(self, parts: RunParts, session: Any, partial: Optional[EpochState], rng_ranks: list,
                      partial_ranks: list) -> dict:
        """Everything an exact resume needs, with live tensors (the writer snapshots them to the CPU). `partial`:
        the next epoch's EpochState when saved mid-epoch (None at an epoch end); `rng_ranks`: every rank's random
        states at the start of that next epoch; `session`: the open StageSession."""
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": parts.model.state_dict(), "optimizer": session.optimizer.state_dict(),
                "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
                "scheduler": session.scheduler.state_dict() if session.scheduler is not None else None,
                "ema": parts.ema.state_dict() if parts.ema is not None else None,
                "stage": session.stage.index, "stage_name": session.stage.name, "epoch": self.epoch,
                "step": partial.step if partial is not None else 0,
                "partial": partial.to_dict() if partial is not None else None,
                "rng": rng_ranks[0], "history": list(self.history), "best_val_acc": self.best_val_acc,
                "stage_best": self.stage_best, "found_lr": dict(self.found_lr),
                "config": parts.config, "overrides": list(parts.overrides), "data": parts.data,
                "world": parts.world, "rng_ranks": rng_ranks, "partial_ranks": partial_ranks}


def describe(state: RunState) -> str:
    """Where a checkpoint stands, for the resume message: 'epoch 3 done, step 20 of epoch 4, stage 'high''."""
    where = f"epoch {state.epoch} done" + (f", step {state.step} of epoch {state.epoch + 1}" if state.step else "")
    return f"{where}, stage '{state.stage_name}'"


def ema_weights(meta: Optional[dict]) -> Optional[dict]:
    """The EMA weights in a checkpoint's metadata (read_weights' second value), torchvision's key names; None
    when the run had no EMA. (AveragedModel keeps them under 'module.', beside its 'n_averaged' counter.)"""
    if meta is None or not meta.get("ema"):
        return None
    return strip_wrapper_prefixes({k: v for k, v in meta["ema"].items() if k.startswith("module.")})


def normalisation(meta: Optional[dict]) -> Optional[tuple]:
    """(mean, std) the checkpointed run normalised its inputs with, or None."""
    if meta is None or not meta.get("data"):
        return None
    return meta["data"]["mean"], meta["data"]["std"]


def saved_overrides(meta: Optional[dict]) -> list:
    """The command-line overrides a checkpoint's run was started with ([] for a file without them)."""
    return [str(o) for o in (meta or {}).get("overrides", [])]


def trained_with(path: Path, meta: Optional[dict]) -> tuple:
    """((mean, std), classes) the weights in `path` were trained with: from the checkpoint's data, else from the
    summary.json beside a model.pt; (None, None) and None where neither says."""
    summary = _summary_beside(path)
    saved = normalisation(meta)
    norm = saved if saved is not None else (summary.get("data_mean"), summary.get("data_std"))
    data = (meta or {}).get("data") or {}
    classes = data.get("classes") or summary.get("classes")
    return norm, (list(classes) if classes else None)


def _summary_beside(path: Path) -> dict:
    summary = path.parent / "summary.json"
    try:
        loaded = json.loads(summary.read_text()) if summary.is_file() else {}
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
