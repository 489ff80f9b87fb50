"""Every reason a training run ends before its last epoch, in one place: a stop request (SIGINT / SIGTERM:
checkpoint, then exit 130 / 143), agreed by all ranks of a data-parallel run, and a non-finite loss (exit 1)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from cbam_train.config.errors import NonFiniteLoss, TrainingError
from cbam_train.training import distributed
from cbam_train.training.distributed import Dist
from cbam_train.training.interrupt import Interrupted, StopRequest

STOP_POLL_STEPS = 10  # data-parallel: steps between the collective checks of the stop flag


class Stopper:
    """`done` turns True when the run must stop at the next safe point (after a step, or at an epoch end)."""

    def __init__(self, signals: StopRequest, dist: Dist, device: torch.device) -> None:
        self.signals, self.dist, self.device = signals, dist, device
        self.done = False
        self._steps = 0
        # data-parallel: a decision every rank must take together (skip a batch, stop on a non-finite loss)
        self.any_rank: Optional[Callable[[bool], bool]] = (
            (lambda flag: distributed.any_(flag, dist, device)) if dist.enabled else None)

    def arm(self) -> None:
        """From now on a first signal asks for a clean stop instead of aborting at once."""
        self.signals.arm()

    def after_step(self) -> bool:
        """The stop flag, agreed by all ranks every STOP_POLL_STEPS steps (one tiny collective): torchrun
        SIGKILLs its workers 30 s after passing a signal on, so the stop must come well before that."""
        self._steps += 1
        if not self.dist.enabled:
            self.done = self.signals()
        elif self._steps % STOP_POLL_STEPS == 0:
            self.done = distributed.any_(self.signals(), self.dist, self.device)
        return self.done

    def at_epoch_end(self) -> bool:
        """The stop flag agreed by all ranks (one collective per epoch)."""
        self.done = distributed.any_(self.signals(), self.dist, self.device)
        return self.done

    def interrupt(self, rep: Any, run_dir: Path, where: str) -> Interrupted:
        """Say where the run stopped and how to resume it; the Interrupted to raise (exit 130 / 143)."""
        name = signal.Signals(self.signals.signum or signal.SIGTERM).name
        rep.print(f"{name}: stopped at {where}; saved {run_dir / 'checkpoints' / 'last.pt'}", quiet_too=True)
        rep.print(f"resume with: cbam-train resume={run_dir}", quiet_too=True)
        return Interrupted(f"{name} at {where}; resume with: cbam-train resume={run_dir}", self.signals.signum)

    @contextmanager
    def on_non_finite_loss(self, checkpointer: Any) -> Iterator[None]:
        """A NonFiniteLoss inside becomes a TrainingError naming the last good checkpoint (once it is on disk)."""
        try:
            yield
        except NonFiniteLoss as e:
            checkpointer.wait()
            raise TrainingError(f"{e}; stopped, {checkpointer.last_good()}; lower the learning rate (lr=...), "
                                "check the data, or set train.nan_policy=skip_batch") from None
