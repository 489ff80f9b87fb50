"""SIGINT / SIGTERM during training: the first asks the loop to stop at the next safe point (after the
current step), where it writes checkpoints/last.pt; a second one aborts at once.

In a submitit job (hydra/launcher=slurm) submitit's own signal (USR2: SLURM sends it before the time limit,
or at a preemption) is taken over the same way: the run stops after its step and writes last.pt, then the
signal goes on to submitit's handler, which requeues the job and ends it. The requeued job resumes from
that checkpoint (cli/launchers.requeued_resume)."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Callable, Optional

EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, what shells report


class Interrupted(Exception):
    """The run stopped on a signal after saving its state; the CLI exits with 130 (SIGINT) or 143 (SIGTERM)."""

    label = "stopped"

    def __init__(self, msg: str, signum: Optional[int]) -> None:
        super().__init__(msg)
        # None: another rank of a data-parallel run was signalled, not this one
        self.exit_code = 1 if signum is None else EXIT_CODES.get(signum, 1)


class StopRequest:
    """Installed for the training loop (`with StopRequest(notify) as stop:`); `stop.signum` is set by the
    first signal. Before `arm()` (while data loads) a signal stops the run at once, as it would without us."""

    def __init__(self, notify: Callable[[str], None]) -> None:
        self.notify, self.armed = notify, False
        self.signum: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        requeue = submitit_signal()
        for s in (*EXIT_CODES, *([requeue] if requeue is not None else [])):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner's worker thread)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        if self.signum is not None and self.signum not in EXIT_CODES and callable(self._old.get(self.signum)):
            signal.raise_signal(self.signum)  # submitit's handler, now the state is saved: requeue, exit

    def arm(self) -> None:
        self.armed = True

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if not self.armed or self.signum is not None:
            raise Interrupted(f"{name}: aborted at once; the last checkpoint written before is kept", signum)
        self.signum = signum
        self.notify(f"{name} received: stopping after this step and saving checkpoints/last.pt "
                    f"({'press Ctrl-C again' if signum == signal.SIGINT else 'send it again'} to abort at once)"
                    + ("; then submitit requeues the job" if signum not in EXIT_CODES else ""))


def submitit_signal(environ: Optional[dict] = None) -> Optional[int]:
    """The signal submitit's handler waits for in this process (SUBMITIT_PREEMPT_SIGNAL, USR2 by default), when
    that handler is installed (a submitit job); None elsewhere."""
    environ = dict(os.environ) if environ is None else environ
    signum = getattr(signal, "SIG" + environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if signum is None:
        return None
    handler = signal.getsignal(signum)
    return signum if callable(handler) and getattr(handler, "__module__", "").startswith("submitit") else None
