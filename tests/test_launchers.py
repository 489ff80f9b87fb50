"""Hydra's own launcher and sweeper plugins, end to end through the CLI: submitit (the SLURM launcher's
local twin) and joblib (parallel jobs on one machine) in a real process, whose children they start; Optuna (search,
its jobs in the sweep's own process) through cli.main in this one. Each sweep's summary is checked: its
rows, their statuses, the values the jobs returned, and a failed job that is recorded while the sweep goes on.
The plugins are in the dev extra, so these run in CI; without a plugin its tests skip, saying which."""

from __future__ import annotations

import json
import pickle

import pytest
import yaml
from conftest import NARROW, PICTURES_OFF, call_cli, run_cli

from cbam_train.cli.launchers import is_main_process, submitit_ranks

# one stage of one epoch on 8x8 images: a job is start-up plus ~1 s of training
TINY = ["experiment=smoke", NARROW, "stage=head", "data.image_size=8", "data.train_size=96", "data.val_size=32",
        "data.test_size=32", "data.batch_size=16", "log.mode=quiet", *PICTURES_OFF]


def needs(module: str, package: str) -> None:
    pytest.importorskip(module, reason=f"{package} is not installed (pip install -e '.[dev]' has it)")


def summary(sweep) -> list:
    return json.loads((sweep / "sweep_summary.json").read_text())


def check_completed_and_failed(sweep, proc, completed: list, failed: list) -> list:
    """The sweep ran every job, recorded the failed one with its line, exited 1, printed no traceback."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]  # it finished, but a job failed
    rows = summary(sweep)
    assert [r["job"] for r in rows if r["status"] == "completed"] == completed
    assert [r["job"] for r in rows if r["status"] == "failed"] == failed
    for r in rows:
        if r["status"] == "completed":
            s = json.loads((sweep / str(r["job"]) / "summary.json").read_text())
            assert r["metric"] == "best_val_acc" and r["value"] == s["best_val_acc"] == r["best_val_acc"]
        else:
            assert r["error"] == "lr must be > 0, got -1.0" and r["value"] is None
    assert f"{len(failed)} of {len(rows)} sweep jobs did not complete" in proc.stderr
    return rows


def test_the_task_function_pickles_by_reference():
    """Launchers that pickle the task function (submitit, joblib) must not drag state along: it pickles as a
    reference to cbam_train.cli.run_task (a few dozen bytes), not as code with its globals."""
    cloudpickle = pytest.importorskip("cloudpickle", reason="cloudpickle is not installed (submitit brings it)")
    from cbam_train.cli import command

    for dumps in (cloudpickle.dumps, pickle.dumps):
        data = dumps(command.run_task)
        assert len(data) < 200 and pickle.loads(data) is command.run_task


def test_submitit_ranks_become_torchrun_variables():
    single = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "1"}
    assert submitit_ranks({}) == {} and submitit_ranks({"WORLD_SIZE": "2", **single}) == {}
    pytest.importorskip("submitit", reason="submitit is not installed (hydra-submitit-launcher brings it)")
    import os

    env = {**single, "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
           "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0"}
    saved = dict(os.environ)
    try:  # submitit's JobEnvironment reads os.environ itself
        os.environ.update(env)
        got = submitit_ranks(env)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert got == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(15000 + 4242)}
    assert not is_main_process(got) and is_main_process({})


@pytest.mark.slow
def test_submitit_local_runs_each_job_and_records_the_failed_one(tmp_path):
    needs("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/launcher=submitit_local", *TINY, "lr=3e-3,-1,1e-3", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path)
    check_completed_and_failed(sweep, proc, completed=[0, 2], failed=[1])
    assert list((sweep / ".submitit").glob("*/*_0_result.pkl"))  # submitit ran them, not the basic launcher


@pytest.mark.slow
def test_submitit_job_with_two_tasks_trains_data_parallel(tmp_path):
    """tasks_per_node=2: submitit starts two processes for the job; they join one gloo process group
    (launchers.submitit_ranks) and split each global batch, as under torchrun; rank 0 alone writes."""
    needs("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *TINY,
                    "log.mode=plain", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = summary(sweep)
    assert row["status"] == "completed" and row["value"] == row["best_val_acc"]
    logs = {p.name: p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out")}
    assert len(logs) == 2  # two tasks
    banner = "data-parallel: 2 processes, global batch 32 (16 per process), 2 steps per epoch"
    assert sum(banner in text for text in logs.values()) == 1  # printed by rank 0 only
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_joblib_runs_two_jobs_at_once_and_records_the_failed_one(tmp_path):
    needs("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher")
    sweep = tmp_path / "sweep"
    # jobs of a few seconds each (16x16, 2 epochs): longer than the skew between the two workers' start-ups
    # (each imports torch before its job's clock starts), so "at the same time" cannot miss on a slow machine
    # at ResNet18's width (the smoke preset's 16 is 1/16 of the work): each job needs that length; no checkpoints
    # (3 of 135 MB per job, and what a job saves is not the subject here)
    longer = ["data.image_size=16", "data.train_size=192", "schedule.stages.head.epochs=2", "model.width=64",
              "train.checkpoint_every_n_epochs=0"]
    tiny = [a for a in TINY if a.split("=")[0] not in ("data.image_size", "data.train_size", "model.width")]
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny, *longer, "lr=3e-3,1e-3,-1",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    check_completed_and_failed(sweep, proc, completed=[0, 1], failed=[2])
    first, second = (json.loads((sweep / str(j) / "status.json").read_text()) for j in (0, 1))
    assert first["pid"] != second["pid"]  # two worker processes
    assert max(first["started"], second["started"]) < min(first["ended"], second["ended"])  # at the same time


@pytest.mark.slow
def test_optuna_search_returns_the_metric_and_the_summary_agrees_with_the_study(tmp_path):
    needs("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper")
    sweep = tmp_path / "sweep"
    proc = call_cli(["-m", "hparams_search=optuna_lr", "hydra.sweeper.n_trials=3", *TINY,
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(sweep)
    assert [r["status"] for r in rows] == ["completed"] * 3
    assert all(r["value"] == r["best_val_acc"] for r in rows)
    study = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert study["best_value"] == max(r["best_val_acc"] for r in rows)
    best = next(r for r in rows if r["best_val_acc"] == study["best_value"])
    assert f"model.cbam.reduction={study['best_params']['model.cbam.reduction']}" in best["overrides"]
    # the seeded TPE sampler proposes the same trials again
    again = call_cli(["-m", "hparams_search=optuna_lr", "hydra.sweeper.n_trials=1", *TINY,
                     f"hydra.sweep.dir={tmp_path / 'again'}"], cwd=tmp_path)
    assert again.returncode == 0 and summary(tmp_path / "again")[0]["overrides"] == rows[0]["overrides"]


@pytest.mark.slow
def test_optuna_records_a_failed_trial_and_the_search_goes_on(tmp_path):
    needs("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper")
    sweep = tmp_path / "sweep"
    # the random sampler at seed 0 proposes each lr once (numpy's seeded RandomState: the same on any machine);
    # the grid sampler cannot be used: hydra-optuna-sweeper 1.3.0 crashes on a failed grid trial (Study.stop)
    proc = call_cli(["-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                    "hydra.sweeper.n_trials=2",
                    "hydra.sweeper.direction=maximize", "lr=choice(-1,1e-3)", *TINY, f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path)
    rows = summary(sweep)
    assert sorted(r["status"] for r in rows) == ["completed", "failed"]
    check_completed_and_failed(sweep, proc, completed=[r["job"] for r in rows if r["status"] == "completed"],
                               failed=[r["job"] for r in rows if r["status"] == "failed"])
    study = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert study["best_value"] == next(r["best_val_acc"] for r in rows if r["status"] == "completed")


def test_a_requeued_job_resumes_from_its_own_checkpoint(tmp_path):
    """In a submitit job on SLURM with SLURM_RESTART_COUNT >= 1 and checkpoints/last.pt: resume from the run
    dir. Nothing anywhere else: a first start, a plain sbatch script, a folder that is not a run, a finished run.
    A job requeued before its first checkpoint starts over, rank 0 keeping the first attempt in attempt-<n>/."""
    from cbam_train.cli.launchers import requeued_resume

    def run_dir(name: str, *files: str):
        folder = tmp_path / name
        for f in (".hydra/overrides.yaml", *files):
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            (folder / f).write_text("x")
        return folder

    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_RESTART_COUNT": "1"}
    run = run_dir("0", "checkpoints/last.pt", "train.log")
    assert requeued_resume(run, job) == str(run)
    assert requeued_resume(run, {**job, "SLURM_RESTART_COUNT": "0"}) is None  # a first start
    assert requeued_resume(run, {"SLURM_RESTART_COUNT": "1"}) is None  # an sbatch script's own cbam-train
    assert requeued_resume(run, {**job, "SUBMITIT_EXECUTOR": "local"}) is None
    assert requeued_resume(run_dir("done", "checkpoints/last.pt", "summary.json"), job) is None  # finished
    plain = tmp_path / "plain"  # a user's folder with other files: never touched
    (plain / "notes.txt").parent.mkdir()
    (plain / "notes.txt").write_text("mine")
    assert requeued_resume(plain, job) is None and [p.name for p in plain.iterdir()] == ["notes.txt"]

    early = run_dir("1", "train.log", "metrics.jsonl", "notes.txt")
    (early / "status.json").write_text("{}")  # the sweep's own record stays where the sweep reads it
    assert requeued_resume(early, {**job, "RANK": "1"}) is None  # another rank: leaves the folder to rank 0
    assert (early / "train.log").is_file()
    assert requeued_resume(early, job) is None
    assert sorted(p.name for p in early.iterdir()) == ["attempt-1", "notes.txt", "status.json"]
    assert sorted(p.name for p in (early / "attempt-1").iterdir()) == [".hydra", "metrics.jsonl", "train.log"]


def test_sacct_errors_are_said_once_per_sweep():
    import logging

    from cbam_train.cli.launchers import quiet_sacct

    said, logger = [], logging.getLogger("submitit.test_sacct_once")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    logger.propagate = False
    quiet_sacct(said.append, logger)
    quiet_sacct(said.append, logger)  # idempotent: one filter
    for call in range(1, 4):
        logger.warning(f"Call #{call} - Bypassing sacct error Command '['sacct']' returned non-zero exit status 1.")
    logger.warning("Job 12 failed")  # any other record passes
    assert len(said) == 1 and "(sacct: Command '['sacct']' returned non-zero exit status 1.)" in said[0]
    assert [r.getMessage() for r in seen] == ["Job 12 failed"]


def test_a_refused_submission_becomes_one_line():
    from cbam_train.cli.hydra_errors import failure_line, submission_refused

    printed = ("sbatch: error: Invalid generic resource (gres) specification\n"
               "subprocess.CalledProcessError: Command '['sbatch', '/s/.submitit/x.sh']' returned non-zero exit "
               "status 1.\n\nThe above exception was the direct cause of the following exception:\n\n"
               "Traceback (most recent call last):\n  File \"/x/submitit/core/utils.py\", line 359, in __call__\n"
               "submitit.core.utils.FailedJobError: sbatch: error: Invalid generic resource (gres) specification\n")
    line = failure_line(printed, [])
    assert line == submission_refused(printed) and "\n" not in line
    assert line.startswith("hydra/launcher=slurm: sbatch refused the job: sbatch: error: Invalid generic resource")
    assert "hydra.launcher.gpus_per_node" in line
    assert submission_refused(printed.replace("'sbatch'", "'squeue'")) is None  # not a submission
