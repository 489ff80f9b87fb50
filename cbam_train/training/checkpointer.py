"""checkpoints/ of a training run: which files an epoch writes, what goes into them (RunState.to_checkpoint),
the background writer and every wait for it. The loop says what happened; only this knows the files."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

from cbam_train.state.rng import capture_rng
from cbam_train.state.run_state import EpochState, RunParts, RunState
from cbam_train.state.weights import cpu_snapshot, save_checkpoint
from cbam_train.training import distributed
from cbam_train.training.distributed import Dist


class BackgroundSaver:
    """save_checkpoint on a background thread, so the disk (~0.2-0.4 s for a 135 MB ResNet18+Adam checkpoint
    here) does not stall training: the state is snapshot to the CPU first, one write is in flight at a time,
    and a failed write raises its CheckpointError at the next save() or wait()."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def save(self, state: dict, folder: Path, names: list, resume_hint: str) -> None:
        self.wait()
        snapshot = cpu_snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot, folder, names, resume_hint),
                                        name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _write(self, *args: Any) -> None:
        try:
            save_checkpoint(*args)
        except BaseException as e:  # handed to the training thread at its next save() / wait()
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def checkpoint_names(epoch: int, every: int, stage: Any, new_best: bool, stage_end: bool) -> list:
    """Files an epoch end writes: last.pt every `every` epochs, at the stage's end and on a new best (then
    also best.pt), stage<k>-<name>.pt at the stage's end; none when every=0."""
    if not every or not (epoch % every == 0 or stage_end or new_best):
        return []
    return ["last.pt"] + ["best.pt"] * new_best + [f"stage{stage.index}-{stage.name}.pt"] * stage_end


class Checkpointer:
    """Writes the run's checkpoints on a background thread (rank 0; every rank calls it at the same points,
    since all ranks' random states go into the file). `with checkpointer:` leaves no write half-done."""

    def __init__(self, run_dir: Path, parts: RunParts, generators: tuple, every_n_epochs: int, dist: Dist) -> None:
        self.parts, self.generators, self.every_n_epochs, self.dist = parts, generators, every_n_epochs, dist
        self.folder, self.resume_hint = Path(run_dir) / "checkpoints", f"cbam-train resume={run_dir}"
        self.last: Optional[str] = None  # "epoch 3" / "epoch 4 + 20 step(s) of epoch 5", for messages
        self._writer = BackgroundSaver()
        self._epoch_rng: Optional[dict] = None

    def start_epoch(self) -> None:
        """Remember the random states at the epoch's start: what a mid-epoch checkpoint restores before skipping."""
        self._epoch_rng = capture_rng(self.generators)

    def mid_epoch(self, state: RunState, session: Any, partial: EpochState) -> None:
        """last.pt with the epoch so far (every train.checkpoint_every_n_steps, and on a stop request)."""
        assert self._epoch_rng is not None  # start_epoch() runs before every epoch's first step
        self._save(["last.pt"], state, session, partial, self._epoch_rng)

    def epoch_end(self, state: RunState, session: Any, new_best: bool, stage_end: bool, stopping: bool) -> None:
        """The files checkpoint_names says for this epoch end; at least last.pt when the run is stopping."""
        names = checkpoint_names(state.epoch, self.every_n_epochs, session.stage, new_best, stage_end)
        if names or stopping:
            self._save(names or ["last.pt"], state, session, None, capture_rng(self.generators))

    def last_good(self) -> str:
        """Which checkpoint a failed run leaves, for its error message."""
        return f"checkpoints/last.pt ({self.last}) is the last good state" if self.last else \
            "no checkpoint was written in this run"

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its CheckpointError if it failed."""
        self._writer.wait()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.wait()  # the last checkpoint is on disk before the run reports success
            return
        try:
            self.wait()  # never leave a write half-done; the error already raised is the one to report
        except Exception:
            pass

    def _save(self, names: list, state: RunState, session: Any, partial: Optional[EpochState], rng: dict) -> None:
        rng_ranks = distributed.gather(rng, self.dist)
        partial_ranks = distributed.gather(partial.to_dict() if partial is not None else None, self.dist)
        epoch = state.epoch
        self.last = f"epoch {epoch}" + (f" + {partial.step} step(s) of epoch {epoch + 1}" if partial else "")
        if self.dist.is_main:
            checkpoint = state.to_checkpoint(self.parts, session, partial, rng_ranks, partial_ranks)
            self._writer.save(checkpoint, self.folder, names, self.resume_hint)
