"""Jobs started by Hydra's launcher plugins. A submitit job with several tasks (SLURM's
`hydra.launcher.tasks_per_node=N` / `nodes=M`, or submitit_local's) runs one process per task but sets only
submitit's variables; the run reads torchrun's (distributed.from_env), so each task gets them here, before
the run starts. Under torchrun, or in a single-task job, nothing changes.

submitit.helpers.TorchDistributedEnvironment does the same mapping, but not as this needs it: its export()
rewrites CUDA_VISIBLE_DEVICES (the run picks cuda:LOCAL_RANK itself) and os.environ in place (these are
returned, to test), and it draws MASTER_PORT at random in 20000-60000, which overlaps Linux's ephemeral ports."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Optional

# MASTER_PORT from the job's own id (SLURM_JOB_ID: unique per array task), so the tasks of one job agree without
# talking; below Linux's ephemeral range (32768-60999), where outgoing connections take their ports
PORT_BASE, PORT_SPAN = 15000, 15000


def submitit_ranks(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """torchrun's variables for this task of a multi-task submitit job ({} when there is nothing to set)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" in environ or not environ.get("SUBMITIT_EXECUTOR"):
        return {}
    import submitit  # present: the job was started by it

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return {}
    digits = re.sub(r"\D", "", str(job.raw_job_id)) or "0"
    return {"RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank), "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // max(1, job.num_nodes)),
            "MASTER_ADDR": "127.0.0.1" if job.num_nodes == 1 else job.hostnames[0],
            "MASTER_PORT": environ.get("MASTER_PORT") or str(PORT_BASE + int(digits) % PORT_SPAN)}


def is_main_process(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Rank 0, or the only process: the one that records a sweep job's status."""
    environ = os.environ if environ is None else environ
    return int(environ.get("RANK", "0")) == 0


class SacctOnce(logging.Filter):
    """On a cluster without job accounting submitit warns 'Bypassing sacct error' at every poll, each record
    printed by three handlers (24 lines for a small sweep). Those records are dropped; the first one is said as
    one warning line of ours instead."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self.say, self.seen = say, False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if not self.seen:
            self.seen = True
            error = record.getMessage().split("Bypassing sacct error", 1)[1].split(", status may be")[0].strip()
            self.say(f"submitit could not read the jobs' states from SLURM's accounting (sacct: {error}); it "
                     "follows the jobs without it (said once per sweep; no accounting on the cluster is the usual "
                     "cause)")
        return False


def quiet_sacct(say: Callable[[str], None], logger: Optional[logging.Logger] = None) -> None:
    """Put one SacctOnce on submitit's logger (once per process: one per sweep)."""
    logger = logger or logging.getLogger("submitit")
    if not any(isinstance(f, SacctOnce) for f in logger.filters):
        logger.addFilter(SacctOnce(say))


# what a run writes into its run dir (state/rundir.RUN_FILES and the rest): all a first attempt can have left
ATTEMPT_FILES = ("metrics.jsonl", "metrics.csv", "summary.json", "model.pt", "train.log", "checkpoints", "curves.png",
                 "attention", "attention.jsonl", "tensorboard", "mlflow_run.json", ".hydra")


def requeued_resume(run_dir: Path, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """In a submitit job on SLURM started again after a timeout or a preemption (SLURM_RESTART_COUNT >= 1) whose
    run dir holds its first attempt's run: that run dir, to resume from, when it has checkpoints/last.pt. None
    anywhere else (a first start, a plain sbatch script, a run that already finished). A job requeued before
    its first checkpoint starts over: rank 0 moves its first attempt's files into <run dir>/attempt-<n>/."""
    environ = os.environ if environ is None else environ
    restarts = environ.get("SLURM_RESTART_COUNT", "")
    if (environ.get("SUBMITIT_EXECUTOR") != "slurm" or not restarts.isdigit() or int(restarts) < 1
            or not (run_dir / ".hydra" / "overrides.yaml").is_file() or (run_dir / "summary.json").exists()):
        return None
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return str(run_dir)
    if is_main_process(environ):
        attempt = run_dir / f"attempt-{restarts}"
        attempt.mkdir(exist_ok=True)
        for name in ATTEMPT_FILES:
            if (run_dir / name).exists():
                (run_dir / name).rename(attempt / name)
    return None
