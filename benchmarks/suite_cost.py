"""What one test-suite run costs: wall time, the pytest result line and the bytes its process tree wrote.

    python benchmarks/suite_cost.py                     # `make test`, what CI runs
    python benchmarks/suite_cost.py make test-fast
    python benchmarks/suite_cost.py make smoke

The bytes come from Linux's per-process I/O accounting (/proc/self/io): a child's counts are added to its parent's
when the parent reaps it, so after the command ends this process's own counts hold the whole tree's (a daemon that
outlives its parent is lost, which the suite does not leave). write_bytes counts every byte dirtied for the disk,
including files deleted before they reached it (cancelled_write_bytes says how many): the load the suite puts on
the page cache and the disk, which is what a full CI disk or a slow disk waits on.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path


def io_counts() -> dict:
    """This process's I/O counters (bytes), its reaped children's included."""
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def main(cmd: list) -> int:
    before = io_counts()
    started = time.perf_counter()
    tail: list = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail = (tail + [line])[-400:]
    wall = time.perf_counter() - started
    after = io_counts()
    written = after["write_bytes"] - before["write_bytes"]
    cancelled = after["cancelled_write_bytes"] - before["cancelled_write_bytes"]
    result = next((ln.strip().strip("=").strip() for ln in reversed(tail)
                   if re.search(r"\d+ (passed|failed|error)", ln)), "no pytest result line")
    print(f"\nsuite_cost: {' '.join(cmd)}: exit {proc.returncode}, {wall:.0f} s wall; {result}; "
          f"{written / 1e9:.2f} GB written ({cancelled / 1e9:.2f} GB of it deleted before it reached the disk)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["make", "test"]))
