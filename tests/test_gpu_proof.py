"""benchmarks/gpu_proof.sh: its command line and plumbing, cheaply (bash, with a stand-in or a bare python: no
torch), and every step end to end at smoke size on the CPU. The GPU run itself: docs/GPU.md."""

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

SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"
STEPS = ["env", "install", "data", "bench", "profile", "seed", "fast"]
RESULTS = ["gpu_proof.log", "gpu_proof_runs.tar.gz", "steps.tsv"]


def _proof(args: list, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """bash gpu_proof.sh ARGS in cwd, with none of the caller's OUT or GPU_PROOF_* and the work folder in cwd."""
    base = {k: v for k, v in child_env().items() if k != "OUT" and not k.startswith("GPU_PROOF_")}
    env = {**base, "GPU_PROOF_WORK": str(cwd / "work"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _steps(out: Path) -> list:
    return [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]


def _stand_in_python(folder: Path, hub: Path) -> Path:
    """A `python` for the steps that only ask it for torch's hub folder (step data): no torch import."""
    py = folder / "python-stand-in"
    py.write_text(f"#!/bin/sh\necho {hub}\n")
    py.chmod(0o755)
    return py


def _bare_python(folder: Path) -> Path:
    """This python without its site-packages (-S): the standard library only, as on a machine with nothing installed."""
    py = folder / "python-bare"
    py.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    py.chmod(0o755)
    return py


def test_without_outdir_or_out_it_prints_the_usage_line_and_exits_2(tmp_path):
    done = _proof([], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("usage: bash benchmarks/gpu_proof.sh ") and done.stderr.count("\n") == 1
    assert "OUTDIR" in done.stderr and done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written: no default folder, no work folder


@pytest.mark.parametrize(("taken", "how"), [("steps.tsv", "arg"), ("gpu_proof.log", "arg"),
                                            ("gpu_proof_runs.tar.gz", "arg"), ("steps.tsv", "OUT")])
def test_an_outdir_holding_a_previous_proof_is_refused_not_overwritten(tmp_path, taken, how):
    out = tmp_path / "proof"
    out.mkdir()
    (out / taken).write_text("the previous proof's\n")
    (out / "notes.txt").write_text("mine\n")
    done = _proof([str(out)], tmp_path) if how == "arg" else _proof([], tmp_path, OUT=str(out))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and f"{out} already holds a proof's results ({taken})" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([taken, "notes.txt"])
    assert (out / taken).read_text() == "the previous proof's\n"
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--fast", "o"], {}, "unknown option --fast"),
    (["o", "p"], {}, "one OUTDIR only"),
    (["--wheels", "nowhere", "o"], {}, "--wheels nowhere: no such folder"),
    (["--data=nowhere", "o"], {}, "--data nowhere: no such file or folder"),
    (["o", "--wheels"], {}, "--wheels needs a path"),
    (["o"], {"GPU_PROOF_STEPS": "env,fats"}, "GPU_PROOF_STEPS: no step 'fats'"),
], ids=["unknown-option", "two-outdirs", "no-wheel-folder", "no-data", "option-without-value", "unknown-step"])
def test_a_bad_command_line_is_one_line_and_exit_2_before_anything_runs(tmp_path, args, env, says):
    done = _proof(args, tmp_path, **env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("gpu_proof: ") and says in done.stderr and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_out_is_the_outdir_when_none_is_given_and_wheels_are_an_explicit_option(tmp_path):
    """How a remote-run tool calls it (OUT set, the wheel folder named): a folder without wheels fails step install,
    with the line that says how to make them; nothing runs python."""
    (tmp_path / "wheels").mkdir()
    done = _proof(["--wheels", "wheels"], tmp_path, OUT="out", GPU_PROOF_STEPS="install", PY="no-python-here")
    out = tmp_path / "out"
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == RESULTS
    assert [r[:2] for r in _steps(out)] == [["install", "1"]]
    log = (out / "gpu_proof.log").read_text()
    assert f"WHEELS={tmp_path}/wheels" in log
    assert f"gpu_proof: no wheels in {tmp_path}/wheels: bash benchmarks/gpu_wheels.sh PYTHON_VERSION" in log


def test_an_outdir_given_wins_over_out(tmp_path):
    (tmp_path / "from_env").mkdir()
    done = _proof(["nested/proof"], tmp_path, OUT=str(tmp_path / "from_env"), GPU_PROOF_STEPS="install",
                  PY=str(_bare_python(tmp_path)))
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "nested" / "proof").iterdir()) == RESULTS
    assert list((tmp_path / "from_env").iterdir()) == []


def test_without_wheels_a_python_lacking_the_packages_gets_one_line_saying_what_to_pip_install(tmp_path):
    done = _proof(["out"], tmp_path, GPU_PROOF_STEPS="install", PY=str(_bare_python(tmp_path)))
    assert done.returncode == 1, done.stdout + done.stderr
    assert [r[:2] for r in _steps(tmp_path / "out")] == [["install", "1"]]
    log = (tmp_path / "out" / "gpu_proof.log").read_text()
    assert "no --wheels" in log and "pip install --no-index" not in log
    lines = [line for line in log.splitlines() if "cannot import" in line]
    assert len(lines) == 1, log
    assert lines[0].startswith("gpu_proof: ") and "cannot import hydra-core, omegaconf, " in lines[0]
    assert f"pip install -e {ROOT} " in lines[0] and "--wheels DIR" in lines[0]
    assert "Traceback" not in log


def test_step_data_unpacks_the_wheel_folders_images_and_copies_its_weights(tmp_path):
    """The wheel folder as gpu_wheels.sh fills it: the images' tarball and the ImageNet weights (stand-ins)."""
    wheels, hub = tmp_path / "wheels", tmp_path / "hub"
    wheels.mkdir()
    with tarfile.open(wheels / "cifar10-jpeg-train.tar.gz", "w:gz") as tar:
        for c in range(3):
            for i in range(2):
                f = tmp_path / f"{c}{i}.jpg"
                f.write_bytes(b"")
                tar.add(f, arcname=f"train/c{c}/{i}.jpg")
    (wheels / "resnet18-f37072fd.pth").write_bytes(b"weights")
    done = _proof(["--wheels", str(wheels), "out"], tmp_path, GPU_PROOF_STEPS="data",
                  PY=str(_stand_in_python(tmp_path, hub)))
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "out" / "gpu_proof.log").read_text()
    assert f"unpacked: {wheels}/cifar10-jpeg-train.tar.gz" in log and "images: 6 in 3 classes" in log
    assert (hub / "checkpoints" / "resnet18-f37072fd.pth").read_bytes() == b"weights"
    assert (tmp_path / "work" / "pretrained").read_text() == "true\n"


def _images(folder: Path) -> None:
    """A folder holding train/: 10 classes of 10 random 32x32 JPEGs, like a clone of the CIFAR-10 JPEG copy."""
    rng = np.random.default_rng(0)
    for c in range(10):
        (folder / "train" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            image.save(folder / "train" / f"c{c}" / f"{i:04d}.jpg")


@pytest.mark.slow
def test_gpu_proof_smoke_runs_every_step_and_collects_the_results(tmp_path):
    """The user's command at smoke size: the environment as found (no --wheels), the images linked from --data, an
    OUTDIR created; then the same command again is refused and leaves the results as they were."""
    _images(tmp_path / "images")
    out = tmp_path / "results" / "proof"
    args = ["--smoke", "--data", str(tmp_path / "images"), str(out)]
    done = _proof(args, tmp_path, timeout=1800, PY=sys.executable)  # above smoke T_TOTAL (1500 s): it reports first
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    assert sorted(p.name for p in out.iterdir()) == RESULTS
    rows = _steps(out)
    status = {r[0]: r[1] for r in rows}
    assert [r[0] for r in rows if "/" not in r[0]] == STEPS
    assert all(v == "0" for v in status.values()), rows
    assert "bench/fp32:16:off" in status
    log = (out / "gpu_proof.log").read_text()
    assert "time limits (s): total" in log and "=== summary" in log and "python 3." in log
    assert "nvidia-smi: not found" in log or "NVIDIA" in log  # a CPU machine skips it, a GPU one prints it
    assert "no --wheels" in log and "found: hydra-core " in log and "pip install --no-index" not in log
    assert f"linked: {tmp_path}/work/data/cifar10-jpeg/train -> {tmp_path}/images/train" in log
    assert "images: 100 in 10 classes" in log

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
    assert not list((tmp_path / "images").rglob(".cbam-cache"))  # the decoded cache went beside the link

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    again = _proof(args, tmp_path, PY=sys.executable)
    assert again.returncode == 2 and "already holds a proof's results" in again.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
