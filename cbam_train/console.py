"""One-line errors on the console: how every failure the user can act on is shown."""

from __future__ import annotations

import sys
from typing import NoReturn


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
