"""benchmarks/gpu_proof.sh at smoke size on the CPU: every step runs, $OUT holds the log, the step table and the
tarball of run dirs, and bench.json parses. The GPU run itself is the device tool's (README, On a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, child_env
from PIL import Image

STEPS = ["env", "install", "data", "bench", "profile", "seed", "fast"]


def _carry(folder: Path) -> None:
    """A carry folder holding a tiny CIFAR-10-like tarball: 10 classes of 10 random 32x32 JPEGs."""
    src = folder / "src" / "train"
    rng = np.random.default_rng(0)
    for c in range(10):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"c{c}" / f"{i:04d}.jpg")
    (folder / "carry").mkdir()
    with tarfile.open(folder / "carry" / "cifar10-jpeg-train.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="train")


@pytest.mark.slow
def test_gpu_proof_smoke_runs_every_step_and_collects_the_results(tmp_path):
    _carry(tmp_path)
    out = tmp_path / "out"
    env = child_env({"GPU_PROOF_SMOKE": "1", "OUT": str(out), "GPU_PROOF_CARRY": str(tmp_path / "carry"),
                     "GPU_PROOF_WORK": str(tmp_path / "work"), "PY": sys.executable})
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_proof.sh")], env=env, capture_output=True,
                          text=True, timeout=1800)  # above the script's own smoke T_TOTAL (1500 s): it reports first
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    assert sorted(p.name for p in out.iterdir()) == ["gpu_proof.log", "gpu_proof_runs.tar.gz", "steps.tsv"]
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    status = {r[0]: r[1] for r in rows}
    assert [r[0] for r in rows if "/" not in r[0]] == STEPS
    assert all(v == "0" for v in status.values()), rows
    assert "bench/fp32:16:off" in status
    log = (out / "gpu_proof.log").read_text()
    assert "time limits (s): total" in log and "=== summary" in log and "python 3." in log
    assert "nvidia-smi: not found" in log or "NVIDIA" in log  # a CPU machine skips it, a GPU one prints it

    with tarfile.open(out / "gpu_proof_runs.tar.gz") as tar:
        names = set(tar.getnames())
        bench = json.load(tar.extractfile("runs/bench-fp32-16-off/bench.json"))
        assert bench["batch_size"] == 16 and bench["train_end_to_end_images_per_s"] > 0
        for run in ("seed", "fast"):
            summary = json.load(tar.extractfile(f"runs/{run}/summary.json"))
            assert summary["epochs_run"] == (3 if run == "seed" else 1)
            assert {f"runs/{run}/metrics.jsonl", f"runs/{run}/curves.png", f"runs/{run}/train.log"} <= names
        assert {"runs/profile-b16.txt", "runs/profile-b16.json", "picks.env"} <= names
        assert {f"logs/{s}.log" for s in STEPS} <= names
        assert not any(n.endswith(("model.pt", ".pt")) or "/checkpoints" in n or "/data/" in n for n in names)
