"""hydra/launcher=slurm against a real SLURM cluster on this machine (tests/slurm_cluster.py): a sweep as a job
array, a 2-task data-parallel job, a refused submission, and jobs stopped at their time limit or preempted that
are requeued, resume from their own checkpoint and end as an uninterrupted job does, bit for bit.

Without the SLURM binaries these tests skip and say how to install them; under CI=true (.ci/run installs them) a
missing binary fails instead. Each job trains a narrow network on a few tiny images, on 1 CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import NARROW, PICTURES_OFF, child_env
from slurm_cluster import INSTALL, PARTITION, Cluster, missing, start, stop
from test_resume import assert_same_run

pytestmark = pytest.mark.slow

SMALL = ["experiment=smoke", NARROW, "data.image_size=16", "data.train_size=96", "data.val_size=32",
         "data.test_size=32", "log.mode=plain", *PICTURES_OFF]
# what this node has: no GPUs, 1 CPU per task, a little memory (slurm.yaml asks for a GPU and 32 GB by default)
ON_CLUSTER = ["-m", "hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
# long enough for a requeue to land mid-run: 4 + 4 epochs of 26 steps after stage 1 (~6-20 s on 1 CPU)
LONGER = ["data.train_size=480", "schedule.stages.high.epochs=4", "schedule.stages.full.epochs=4"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    gone = missing()
    if gone or os.geteuid() != 0:
        why = (f"no SLURM on this machine ({', '.join(gone)} missing): {INSTALL}" if gone
               else "slurmd must run as root to start jobs as their user")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {why}; .ci/run installs the packages before make test")
        pytest.skip(why)
    cluster = start(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop(cluster)


def cli(cluster: Cluster, args: list, cwd: Path) -> subprocess.Popen:
    """`cbam-train ARGS` as a user on a login node runs it: its own process, the cluster's SLURM_CONF, and no
    OMP_NUM_THREADS (the jobs take their threads from their CPU share)."""
    env = {k: v for k, v in child_env(cluster.env).items() if k != "OMP_NUM_THREADS"}
    return subprocess.Popen([sys.executable, "-m", "cbam_train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, cluster: Cluster, timeout_s: float = 300) -> tuple:
    """Wait for the sweep's process, starting requeued jobs at once; (exit code, stdout, stderr)."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        cluster.release_requeued()
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
        raise AssertionError(f"the sweep did not end in {timeout_s:.0f} s; {cluster.log_tails()}")
    out, err = proc.communicate()
    return proc.returncode, out, err


def test_a_sweep_runs_as_sbatch_jobs_on_their_cpu_share(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    code, out, err = finish(cli(cluster, [*ON_CLUSTER, *SMALL, "lr=1e-3,3e-4", f"hydra.sweep.dir={sweep}"],
                                tmp_path), cluster)
    assert code == 0, err
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert sorted(r["status"] for r in summary) == ["completed", "completed"]
    for job in ("0", "1"):  # each 1-CPU job ran torch on 1 thread, and said where the figure came from (a
        log = (sweep / job / "train.log").read_text()  # cgroup quota of 1 CPU on this machine would be named)
        assert "| 1 thread(s) (SLURM_CPUS_PER_TASK=1)" in log or "| 1 thread(s) (cgroup" in log
    assert "Bypassing sacct" not in out + err  # no accounting here: one line of ours at most, not one per poll
    assert (out + err).count("submitit could not read the jobs' states") <= 1


def test_a_refused_submission_is_one_line(cluster, tmp_path):
    """slurm.yaml's default asks for a GPU this node does not have: sbatch refuses, and the user reads why."""
    args = [a for a in ON_CLUSTER if "gpus_per_node" not in a]
    code, out, err = finish(cli(cluster, [*args, *SMALL, "lr=1e-3,3e-4", f"hydra.sweep.dir={tmp_path / 's'}"],
                                tmp_path), cluster, timeout_s=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err
    assert lines == ["error: hydra/launcher=slurm: sbatch refused the job: sbatch: error: Invalid generic resource "
                     "(gres) specification; check hydra.launcher.gpus_per_node, hydra.launcher.partition, "
                     "hydra.launcher.mem_gb (hydra.launcher.gpus_per_node=0 on a cluster without GPUs)"]


def test_a_two_task_job_trains_data_parallel_in_one_run_dir(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*ON_CLUSTER, *SMALL, "hydra.launcher.tasks_per_node=2", "device=cpu", "seed=0",
            f"hydra.sweep.dir={sweep}"]
    code, out, err = finish(cli(cluster, args, tmp_path), cluster)
    assert code == 0, err
    assert "data-parallel: 2 processes" in (sweep / "0" / "train.log").read_text()
    assert json.loads((sweep / "sweep_summary.json").read_text())[0]["status"] == "completed"


def _requeue_mid_run(cluster: Cluster, tmp_path: Path, extra: list, interrupt) -> Path:
    """A sweep of two identical jobs; once job 0 has written its first checkpoint, interrupt(job id) stops it.
    Returns the sweep dir after both ended; job 1 ran uninterrupted."""
    sweep = tmp_path / "sweep"
    proc = cli(cluster, [*ON_CLUSTER, *SMALL, *LONGER, "seed=0,0", f"hydra.sweep.dir={sweep}", *extra], tmp_path)
    first = sweep / "0" / "checkpoints" / "last.pt"
    cluster.wait_for(lambda: first.is_file() or proc.poll() is not None, 120, 0.05, "job 0's first checkpoint")
    assert proc.poll() is None, "the sweep ended before job 0 could be interrupted"
    job = next((j for j, state, _ in cluster.jobs() if j.endswith("_0") and state == "RUNNING"), None)
    assert job is not None, f"job 0 is not running: {cluster.jobs()}"
    interrupt(job)
    code, out, err = finish(proc, cluster)
    assert code == 0, err
    assert [r["status"] for r in json.loads((sweep / "sweep_summary.json").read_text())] == ["completed"] * 2
    assert "resuming from" in (sweep / "0" / "train.log").read_text()
    assert "resuming from" not in (sweep / "1" / "train.log").read_text()  # the twin ran in one go
    return sweep


def test_a_preempted_job_is_requeued_and_ends_as_an_uninterrupted_one(cluster, tmp_path):
    """`scontrol requeue`, as a preemption does: SIGTERM, the run checkpoints and stops, SLURM starts the job
    again, and it resumes from its own run dir."""
    sweep = _requeue_mid_run(cluster, tmp_path, [], lambda job: cluster.run("scontrol", "requeue", job))
    assert "SIGTERM received: stopping after this step" in (sweep / "0" / "train.log").read_text()
    assert_same_run(sweep / "0", sweep / "1")  # metrics rows (timings aside) and model.pt


def test_a_job_at_its_time_limit_is_requeued_and_ends_as_an_uninterrupted_one(cluster, tmp_path):
    """A job at its time limit gets the signal SLURM sends signal_delay_s before it (submitit's USR2, sent here
    with scancel --signal once the job has a checkpoint, rather than waited for); with timeout_min=1 submitit
    counts it as a timeout, requeues the job (max_num_timeout allows it) and the job resumes."""
    extra = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=1", "hydra.launcher.max_num_timeout=3"]
    sweep = _requeue_mid_run(cluster, tmp_path, extra,
                             lambda job: cluster.run("scancel", "--signal=USR2", job))
    # the run saved its state at the signal, then submitit requeued the job
    assert "SIGUSR2 received: stopping after this step and saving checkpoints/last.pt" in \
        (sweep / "0" / "train.log").read_text()
    # SLURM's account of it (submitit's own log of the first attempt is overwritten by the second's)
    assert "DUE TO JOB REQUEUE" in "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_0_log.err"))
    assert_same_run(sweep / "0", sweep / "1")  # metrics rows (timings aside) and model.pt
