"""Checkpoints and exact resume, through the real CLI: SIGKILL at several points and resume gives the
bit-identical metrics.jsonl and model.pt of an uninterrupted run; SIGINT/SIGTERM stop cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import NARROW, PICTURES_OFF, call_cli, child_env

from cbam_train.state.weights import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

# 12 batches per epoch, 2 epochs per stage: kills can land inside a stage, at its boundary and mid-epoch
BASE = ["experiment=smoke", NARROW, "data.image_size=8", "data.train_size=224", "data.val_size=32", "data.test_size=32",
        "data.batch_size=16", "log.mode=plain", "log.every_n_steps=1", "schedule.stages.head.epochs=2",
        "schedule.stages.high.epochs=2", "schedule.stages.full.epochs=2"]
TIME_FIELDS = ("epoch_time_s", "train_images_per_s")


DEADLINE_S = 600  # one run_until; a smoke-sized run takes ~20 s on a 2-core VM


def start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cbam_train", *args], cwd=cwd, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_until(args: list, cwd: Path, line_part: str | None = None, sig: int = signal.SIGKILL,
              wait_for: Path | None = None) -> tuple:
    """Run the CLI; send `sig` as soon as an output line contains line_part (and, with wait_for, that file
    exists: checkpoints are written on a background thread, so the line can come before the file).
    A run still going after DEADLINE_S is killed, so a stuck child cannot hang the suite. (returncode, output)"""
    p = start(args, cwd)
    watchdog = threading.Timer(DEADLINE_S, p.kill)
    watchdog.start()
    out = []
    try:
        for line in p.stdout:
            out.append(line)
            if line_part is not None and line_part in line:
                while wait_for is not None and not wait_for.exists() and p.poll() is None:
                    time.sleep(0.005)
                p.send_signal(sig)
                if sig == signal.SIGKILL:
                    break
                line_part = None  # the run goes on to its safe point; read the rest
        out.append(p.stdout.read())
        p.wait(timeout=DEADLINE_S)
    finally:
        watchdog.cancel()
    return p.returncode, "".join(out)


def rows(run_dir: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    assert rows(a) == rows(b)
    sa, sb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one is compared with (in this process: the kills and resumes that
    are compared with it are real processes)."""
    tmp = tmp_path_factory.mktemp("ref")
    proc = call_cli(BASE + [f"hydra.run.dir={tmp / 'run'}"], tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(rows(tmp / "run")) == 6
    return tmp / "run"


@pytest.mark.slow
def test_checkpoints_hold_everything_a_resume_needs(reference):
    ck = reference / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["best.pt", "last.pt", "stage1-head.pt", "stage2-high.pt",
                                                    "stage3-full.pt"]
    last = torch.load(ck / "last.pt", weights_only=True)
    assert last["format"] == CHECKPOINT_FORMAT and last["version"] == CHECKPOINT_VERSION
    assert (last["epoch"], last["step"], last["stage"], last["stage_name"]) == (6, 0, 3, "full")
    assert set(last["rng"]) == {"python", "numpy", "torch", "cuda", "loader"}
    assert last["optimizer"]["state"] and last["config"]["data"]["train_size"] == 224
    assert [r["epoch"] for r in last["history"]] == [1, 2, 3, 4, 5, 6]
    model = torch.load(reference / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], last["model"][k]) for k in model)
    head = torch.load(ck / "stage1-head.pt", weights_only=True)
    assert (head["epoch"], head["stage_name"]) == (2, "head")
    vals = [r["val_acc"] for r in rows(reference)]
    best = torch.load(ck / "best.pt", weights_only=True)
    assert best["epoch"] == vals.index(max(vals)) + 1 and best["best_val_acc"] == max(vals)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(reference, tmp_path):
    """Five real SIGKILLs in one run: before the first checkpoint (the resume starts over in the same dir),
    mid-epoch in the first stage (resumed from a mid-epoch checkpoint), at the stage-1/2 boundary, mid-epoch in
    stage 2, and just after an epoch's metrics row (its checkpoint may or may not be on disk).
    train.checkpoint_every_n_steps only adds checkpoints: it must not change a number."""
    run = tmp_path / "run"
    rc, out = run_until(BASE + ["train.checkpoint_every_n_steps=3", f"hydra.run.dir={run}"], tmp_path,
                        "epoch 1 (head) step 1/")
    assert rc == -signal.SIGKILL, out
    assert not (run / "checkpoints" / "last.pt").exists()
    resumed = []
    for kill_at in ("epoch 1 (head) step 4/", "stage 2/3", "epoch 4 (high) step 8/", "epoch   5 [full]", None):
        # the first of these kills waits for the step-3 checkpoint to be on disk (its write runs beside step 4)
        first_ckpt = run / "checkpoints" / "last.pt" if kill_at == "epoch 1 (head) step 4/" else None
        rc, out = run_until([f"resume={run}"], tmp_path, kill_at, wait_for=first_ckpt)
        assert rc == (0 if kill_at is None else -signal.SIGKILL), out
        resumed.append(next(line for line in out.splitlines() if line.startswith("resuming from")
                            or "no checkpoint yet" in line))
    assert "no checkpoint yet: starting the run again" in resumed[0]
    # continued mid-epoch inside the first stage: from step 3, or step 6 if its write also landed before the kill
    # (one write is in flight at a time, so the loop cannot get past step 6 before step 3's file exists)
    assert re.search(r"step [36] of epoch 1\b", resumed[1]), resumed[1]
    assert_same_run(reference, run)
    assert (run / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_at_a_safe_point_saves_and_resumes_exactly(reference, tmp_path, sig, code):
    run = tmp_path / "run"
    rc, out = run_until(BASE + [f"hydra.run.dir={run}"], tmp_path, "epoch 3 (high) step 5/", sig)
    assert rc == code, out
    assert f"resume with: cbam-train resume={run}" in out
    assert "Traceback" not in out
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and 5 <= last["step"] < 12  # stopped mid-epoch 3, after the step it was in
    assert len(rows(run)) == 2 and not (run / "model.pt").exists()
    if sig == signal.SIGTERM:
        return  # the resume itself is the same as after SIGINT, tested there
    # a harmless change (logging) is allowed and changes no number
    rc, out = run_until([f"resume={run}", "log.every_n_steps=4"], tmp_path)
    assert rc == 0, out
    assert_same_run(reference, run)


@pytest.mark.slow
def test_resuming_a_finished_run_is_refused(reference, cli):
    before = (reference / "metrics.jsonl").read_bytes()
    proc = cli(f"resume={reference}", run_dir=reference)
    assert proc.returncode == 2 and "already finished" in proc.stderr
    assert (reference / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_branches_into_a_new_dir(reference, tmp_path):
    """stage1-head.pt of a finished run: the rest of the schedule runs in a new dir, bit-identical to the
    original; the original's files are untouched."""
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir() if p.is_file()}
    branch = tmp_path / "branch"
    proc = call_cli([f"resume={reference / 'checkpoints' / 'stage1-head.pt'}", f"hydra.run.dir={branch}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_run(reference, branch)
    assert before == {p.name: p.stat().st_mtime_ns for p in reference.iterdir() if p.is_file()}


@pytest.mark.parametrize("override, key", [("model.cbam.reduction=8", "model.cbam.reduction: 16 -> 8"),
                                           ("model.width=16", "model.width: 8 -> 16"),
                                           ("data.train_size=96", "data.train_size: 224 -> 96"),
                                           ("seed=3", "seed: 0 -> 3")])
@pytest.mark.slow
def test_resume_that_changes_model_or_data_is_refused_naming_the_keys(reference, cli, tmp_path, override, key):
    proc = cli(f"resume={reference / 'checkpoints' / 'stage1-head.pt'}", override)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: resume:") and key in errors[0], proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resume_of_an_earlier_checkpoint_into_its_own_dir_is_refused(reference, cli):
    before = (reference / "metrics.jsonl").read_bytes()
    proc = cli(f"resume={reference / 'checkpoints' / 'stage1-head.pt'}", run_dir=reference)
    assert proc.returncode == 2 and "would overwrite the run's later results" in proc.stderr
    assert (reference / "metrics.jsonl").read_bytes() == before


# --- in-process: the torchvision loader, non-finite losses, a full disk ------------------------------------

TINY = ["experiment=smoke", NARROW, "data.image_size=8", "data.train_size=96", "data.val_size=32", "data.test_size=32",
        "data.batch_size=16", "log.mode=quiet", *PICTURES_OFF]


@pytest.mark.slow
def test_torchvision_loader_gives_the_same_run_for_any_number_of_workers(tmp_path):
    """Two epochs (persistent workers draw differently from the second on), and a 2-worker run resumed at
    the stage boundary (a fresh DataLoader iterator) equal to the uninterrupted 0-worker run."""
    from conftest import compose_config

    from cbam_train.training.train import run

    args = TINY + ["data.loader=torchvision", "stage=head", "schedule.stages.head.epochs=2"]
    for w in (0, 2):
        run(compose_config(args + [f"data.num_workers={w}"]), tmp_path / f"w{w}")
    assert_same_run(tmp_path / "w0", tmp_path / "w2")
    first = tmp_path / "w2" / "checkpoints" / "first.pt"
    run(compose_config(TINY + ["data.loader=torchvision", "stage=head", "schedule.stages.head.epochs=1",
                               "data.num_workers=2"]), tmp_path / "e1")
    (tmp_path / "e1" / "checkpoints" / "last.pt").rename(first)
    run(compose_config(args + ["data.num_workers=2", f"resume={first}"]), tmp_path / "resumed")
    assert_same_run(tmp_path / "w0", tmp_path / "resumed")


def test_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from cbam_train.config.errors import WeightsError
    from cbam_train.state.resume import find_resume

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": CHECKPOINT_FORMAT, "model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        find_resume(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_config_changes_sort_refused_harmless_and_other_keys():
    from cbam_train.config.errors import ConfigError
    from cbam_train.state.resume import check_resume_config, resume_changes

    old = {"model": {"cbam": {"reduction": 16}}, "log": {"mode": "plain"}, "optim": {"weight_decay": 0.0},
           "data": {"limit": None, "num_workers": 4}, "seed": 0}
    same_but_harmless = {**old, "log": {"mode": "rich"}, "data": {"limit": None, "num_workers": 0}}
    assert resume_changes(old, same_but_harmless) == ([], [])
    other = {**old, "optim": {"weight_decay": 5e-4}}
    assert check_resume_config(old, other, "x") == ["optim.weight_decay: 0.0 -> 0.0005"]
    with pytest.raises(ConfigError, match=r"data.limit: None -> 100"):
        check_resume_config(old, {**old, "data": {"limit": 100, "num_workers": 4}}, "x")
    # a checkpoint from before model.width existed ran at its default, 64: the same width resumes, another is refused
    now = {**old, "model": {"cbam": {"reduction": 16}, "width": 64}}
    assert resume_changes(old, now) == ([], [])
    with pytest.raises(ConfigError, match=r"model.width: 64 -> 16"):
        check_resume_config(old, {**now, "model": {"cbam": {"reduction": 16}, "width": 16}}, "x")


@pytest.mark.slow
def test_resuming_a_run_with_results_but_no_checkpoint_is_refused(tmp_path):
    """train.checkpoint_every_n_epochs=0 leaves no last.pt: starting over would overwrite the results."""
    from conftest import compose_config

    from cbam_train.config.errors import UserError
    from cbam_train.training.train import run

    args = TINY + ["stage=head", "train.checkpoint_every_n_epochs=0"]
    run(compose_config(args), tmp_path / "run", {"overrides.yaml": "[]\n"})
    assert not (tmp_path / "run" / "checkpoints").exists()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(UserError, match="has no checkpoints/last.pt but holds results"):
        run(compose_config(args + [f"resume={tmp_path / 'run'}"]), tmp_path / "run")
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
