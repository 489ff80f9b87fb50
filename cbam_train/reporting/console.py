"""One-line errors on the console: how every failure the user can act on is shown."""

from __future__ import annotations

import io
import sys
from typing import NoReturn


class CapturedStderr(io.StringIO):
    """stderr while Hydra composes: its composition errors land here and cli.main() condenses them to one
    line. `real` is the stream to hand back. Whoever releases it finds it on sys.stderr itself (no module
    state), so launchers that pickle the task function (submitit, joblib) have nothing to carry."""

    def __init__(self, real) -> None:
        super().__init__()
        self.real = real


def release_stderr() -> None:
    """Composition succeeded: from here on stderr is the run's own (a no-op in a launcher's worker process).
    Called by the task function, and by the sweep callback when a multirun starts (so a sweep's parent
    process does not hold back its own stderr for as long as the sweep runs)."""
    if isinstance(sys.stderr, CapturedStderr):
        sys.stderr.real.write(sys.stderr.getvalue())
        sys.stderr.seek(0)
        sys.stderr.truncate()
        sys.stderr = sys.stderr.real


def print_error(msg: str, label: str = "error") -> None:
    """One red line on stderr."""
    from rich.console import Console
    from rich.text import Text

    if "Original Traceback" in msg:  # an error raised in a DataLoader worker: keep its own last line
        msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text.assemble((f"{label}: ", "bold red"), msg))


def fail(msg: str, code: int = 2, label: str = "error") -> NoReturn:
    """Print one red line to stderr and exit."""
    print_error(msg, label)
    sys.exit(code)
