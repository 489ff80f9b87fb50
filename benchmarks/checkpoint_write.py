"""How long a checkpoint stalls training: a synchronous atomic write (temp file, fsync, rename) of a
ResNet18+CBAM + Adam checkpoint, against the time the training thread spends in BackgroundSaver.save
(the CPU snapshot; the write itself runs on a thread).

    .venv/bin/python benchmarks/checkpoint_write.py --dir /tmp/ckbench --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from cbam_train.models import ResNetCBAM
from cbam_train.state.weights import atomic_save
from cbam_train.training.checkpointer import BackgroundSaver


def checkpoint_like() -> dict:
    """A model with Adam state for every parameter: the size of a full-stage checkpoint."""
    model = ResNetCBAM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ckbench"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint_like()
    atomic_save(state, args.dir / "size.pt")
    mb = (args.dir / "size.pt").stat().st_size / 2**20
    sync, stall = [], []
    saver = BackgroundSaver()
    for _ in range(args.repeats):
        t = time.perf_counter()
        atomic_save(state, args.dir / "sync.pt")
        sync.append(time.perf_counter() - t)
        saver.wait()  # the previous background write is done: measure the stall of a save alone
        t = time.perf_counter()
        saver.save(state, args.dir, ["last.pt"], "-")
        stall.append(time.perf_counter() - t)
    saver.wait()
    print(f"checkpoint {mb:.0f} MB | synchronous write+fsync: median {statistics.median(sync):.3f} s "
          f"(min {min(sync):.3f}) | training thread stall with BackgroundSaver: median "
          f"{statistics.median(stall):.3f} s (min {min(stall):.3f}) | {args.repeats} repeats")


if __name__ == "__main__":
    main()
